"""Data flagging as a Ray Data pipeline: the scoring of ``steerlib.finetuning.flag.scoring`` spread over model-holding actors.

``ray.data.from_items(samples).map_batches(RayScorer, compute=ActorPoolStrategy(size=n), batch_size=b)``:
each actor loads the model once (``steerlib.core.models.load_model``) and scores batches with the same
``flag.score_pairs`` as the single-process path, so results agree up to float noise. Results stream back
to the driver, which appends them to the same resumable JSONL as ``flag.score_dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlib.core.vectors import VectorSource
from steerlib.finetuning.flag.scoring import (
    Baseline,
    FlagResult,
    finished_records,
    length_sorted_batches,
    plan_run,
    sample_record,
    score_pairs,
)
from steerlib.store.results import ResultsStore
from steerlib.store.samples import ReadResult, Sample

__all__ = ["RayScorer", "score_dataset_ray"]


class RayScorer:
    """Callable class for ``Dataset.map_batches``: one model per actor, scoring one batch per call.

    Args:
        model_path: model to load (None: embedded SmolLM2).
        direction: unit trait direction [D] as a float32 array.
        layer: residual-stream layer.
        baseline: "none", "generate" or "prompt_last".
        max_new_tokens: length of generated baseline responses.
        dtype: model dtype.
        num_threads: torch intra-op threads per actor (match the actor's CPUs so actors do not oversubscribe).
    """

    def __init__(
        self,
        model_path: str | None,
        direction: np.ndarray,
        layer: int,
        baseline: Baseline = "none",
        max_new_tokens: int = 64,
        dtype: str = "float32",
        num_threads: int | None = None,
    ) -> None:
        from steerlib.core.models import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.tokenizer = load_model(model_path, dtype=dtype)
        self.direction = torch.as_tensor(np.asarray(direction, dtype=np.float32))
        self.layer = layer
        self.baseline = baseline
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = score_pairs(
            self.model, self.tokenizer, [str(p) for p in batch["prompt"]],
            [str(r) for r in batch["response"]], self.direction, self.layer, baseline=self.baseline,
            max_new_tokens=self.max_new_tokens,
        )
        # One JSON string per row: optional fields and None values need no fixed column schema.
        return {"index": np.asarray(batch["index"], dtype=np.int64),
                "result": np.array([json.dumps(r) for r in records], dtype=object)}


def score_dataset_ray(
    model_path: str | Path | None,
    samples: Sequence[Sample] | ReadResult | str | Path,
    vectors: VectorSource | str | Path,
    layer: int,
    *,
    out_path: str | Path,
    batch_size: int = 16,
    baseline: Baseline = "none",
    max_new_tokens: int = 64,
    resume: bool = True,
    kind: str | None = None,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1,
    address: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> FlagResult:
    """``flag.score_dataset`` on a Ray Data pipeline; same results file, same resume rules.

    Args:
        model_path: model each actor loads (None: embedded SmolLM2; a path must be readable on every node).
        samples: ``Sample`` list, a ``ReadResult`` or a data file path.
        vectors: TraitVectors, a tensor or a saved vectors path.
        layer: residual-stream layer.
        out_path: results JSONL (resumable).
        batch_size: rows per ``map_batches`` call.
        baseline: "none", "generate" or "prompt_last".
        max_new_tokens: length of generated baseline responses.
        resume: skip samples already in ``out_path``.
        kind: TraitVectors pooling kind.
        concurrency: number of scoring actors.
        num_cpus_per_actor: CPUs reserved per actor (also its torch thread count, rounded up).
        address: Ray cluster to join; None uses the running instance or starts a local one (shut down after).
        dtype: model dtype.
        progress: show Ray's progress bars.
    """
    import ray

    from steerlib.core.arch import get_layout
    from steerlib.core.models import load_model_skeleton

    if concurrency < 1 or batch_size < 1:
        raise ValueError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    (skeleton, tokenizer), _ = load_model_skeleton(model_path)  # the shape and tokenizer: actors load weights
    layout = get_layout(skeleton)
    n_layers = layout.n_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers}")
    layer %= n_layers + 1  # negatives count from the end, as Layout.check_layer does
    plan = plan_run(tokenizer, samples, vectors, layer, baseline=baseline, kind=kind,
                    max_new_tokens=max_new_tokens, d_model=layout.d_model)
    by_index, prompts, direction = plan.by_index, plan.prompts, plan.direction
    out_path = Path(out_path)
    store = ResultsStore(out_path, plan.config, resume=resume)
    done = finished_records(store, set(by_index))
    # Same length-sorted order as the local path, so most batches hold the same samples.
    order = [i for batch in length_sorted_batches(plan.lengths, batch_size) for i in batch if i not in done]
    computed = 0
    if order:
        started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            started = True
        # Absolute: actors need not share the driver's working directory.
        actor_model_path = None if model_path is None else str(Path(model_path).expanduser().resolve())
        ctx = ray.data.DataContext.get_current()
        bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = progress
        try:
            rows: list[dict[str, Any]] = [{"index": i, "prompt": prompts[i], "response": by_index[i].response}
                                          for i in order]
            n_blocks = max(1, min(len(rows) // batch_size, 4 * concurrency))
            ds = ray.data.from_items(rows, override_num_blocks=n_blocks).map_batches(
                RayScorer,
                fn_constructor_kwargs={
                    "model_path": actor_model_path,
                    "direction": direction.numpy(), "layer": layer, "baseline": baseline,
                    "max_new_tokens": max_new_tokens, "dtype": dtype,
                    "num_threads": max(1, int(np.ceil(num_cpus_per_actor))),
                },
                compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size,
                num_cpus=num_cpus_per_actor,
                batch_format="numpy",
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                new = [sample_record(by_index[int(i)], json.loads(r))
                       for i, r in zip(batch["index"], batch["result"], strict=True)]
                done.update((r["index"], r) for r in new)
                store.append(new)
                computed += len(new)
        finally:
            ctx.enable_progress_bars = bars
            if started:
                ray.shutdown()
    records = [done[i] for i in sorted(done)]
    return FlagResult(records=records, layer=layer, baseline=baseline, out_path=out_path, computed=computed)
