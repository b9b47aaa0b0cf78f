"""The pipeline's vLLM engine (``steerlib extract --engine vllm``, ``flag --baseline generate``): answers and
pooled activations from one in-process engine.

A stage hands the engine its whole job at once (``stream``): vLLM's scheduler admits requests as its KV memory
allows, and each answer is yielded the moment it finishes, so the caller's store writes it then (a killed job
loses only the answers in flight). Activations are read inside vLLM (``capture``, ``steerlib.vllm.capture``): each
(prompt, response) is one prefill-only request whose pooled residuals the worker reduces and returns, on the same
tokens the HF capture (``steerlib.core.capture``) pools, so no second copy of the model runs. Greedy decoding
gives the HF path's tokens on the embedded model (the tests compare them); sampled responses differ from HF's as
any two samplers' do.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from steerlib.core.capture import Activations, activations_from_pooled, encode_samples
from steerlib.extraction.engine import answers_in_order
from steerlib.vllm.capture import CAPTURE_KEY
from steerlib.vllm.layout import VllmOptions, bound_cores, one_process, start_config

__all__ = ["COMPILE_FROM_TOKENS", "VllmGenerator", "start_mode"]

# Generated tokens from which a compiled engine finishes a job sooner than an eager one (start + run), measured on
# the project's 2-core CPU machine with the embedded model (README, "The pipeline on vLLM"): compiling adds
# ~55 s to the start with a warm compile cache (~3.5 min cold) and saves ~0.65 ms per generated token in a full
# batch (107 vs 100 tokens/s). Below it the engine starts eager.
COMPILE_FROM_TOKENS = 100_000
START_MODES = ("auto", "eager", "compiled")


def start_mode(compile: str, job_tokens: int | None, eager_option: bool = False) -> str:
    """``"eager"`` or ``"compiled"``: how an engine for a job of ``job_tokens`` generated tokens starts.

    ``compile="auto"`` compiles from ``COMPILE_FROM_TOKENS`` on (a job of unknown size, or capture only, starts
    eager); ``eager_option`` (``VllmOptions.enforce_eager``) forces eager."""
    if compile not in START_MODES:
        raise ValueError(f"compile must be one of {START_MODES}, got {compile!r}")
    if eager_option:
        if compile == "compiled":
            raise ValueError("compile='compiled' contradicts enforce_eager=True")
        return "eager"
    if compile != "auto":
        return compile
    return "compiled" if job_tokens is not None and job_tokens >= COMPILE_FROM_TOKENS else "eager"


class VllmGenerator:
    """The pipeline's engine on an in-process ``vllm.LLM``: a callable ``(prompts, max_new_tokens, temperature,
    seed) -> texts``, a streaming ``stream`` and the pooled-activation ``capture`` (``PipelineEngine``).

    Args:
        model_folder: a Hugging Face model folder (``steerlib.core.models.resolve_model_path``).
        options: vLLM's engine arguments (``VllmOptions``; default: one worker, the context limit
            ``max_model_len=2048``).
        compile: ``"auto"`` (by the job's size: ``start_mode``), ``"eager"`` or ``"compiled"``.

    The engine starts on first use (or ``start``), sized by the first submission (its prompts x new tokens), after
    its layout is checked (``check_layout``) and, for several CPU workers, their cores bound (a script using it
    needs an ``if __name__ == "__main__":`` guard: vLLM spawns its engine process). One engine serves every stage
    of a job.
    """

    def __init__(self, model_folder: str | Path, options: VllmOptions | None = None, compile: str = "auto"):
        self.model_folder = str(model_folder)
        self.options = options if options is not None else VllmOptions(max_model_len=2048)
        self.compile = compile
        start_mode(compile, None, self.options.enforce_eager)  # a bad choice fails here, before any start
        self.kwargs = self.options.engine_args(self.model_folder)
        self.mode: str | None = None  # "eager" / "compiled" once started
        self._llm: Any = None

    @classmethod
    def from_llm(cls, llm: Any, model_folder: str | Path = "") -> VllmGenerator:
        """Wrap a ``vllm.LLM`` already started with steerlib's plugin (e.g. one engine shared by several jobs);
        ``close()`` then shuts it down."""
        gen = cls(model_folder or llm.llm_engine.model_config.model)
        gen._llm = llm
        return gen

    @property
    def llm(self) -> Any:
        """The started ``vllm.LLM`` (started on first use)."""
        return self._engine()

    def start(self, job_tokens: int | None = None) -> None:
        """Start the engine now (no-op when started), eager or compiled by ``job_tokens`` (``start_mode``)."""
        if self._llm is not None:
            return
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        self.mode = start_mode(self.compile, job_tokens, self.options.enforce_eager)
        kwargs = {**self.kwargs, "enforce_eager": self.mode == "eager"}
        config = start_config(kwargs, asynchronous=False)  # refuses a layout steering is not right under
        world = config.parallel_config.world_size
        with bound_cores(world, whole_machine=True), one_process(world, kwargs):
            self._llm = LLM(**kwargs)

    def _engine(self) -> Any:
        self.start()
        return self._llm

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        return answers_in_order(self, prompts, max_new_tokens, temperature, seed)

    def stream(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
               seeds: Sequence[int] | None = None) -> Iterator[list[tuple[int, str]]]:
        """Submit every prompt at once; yield, after each engine step that finished some, their ``(index, text)``.

        ``seeds[i]`` is prompt ``i``'s sampling seed (per prompt, so a resumed job draws the same answers).
        Closing the iterator early aborts the requests still in flight."""
        from vllm import SamplingParams

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self.start(len(prompts) * max_new_tokens)
        tok = self._llm.get_tokenizer()
        requests = []
        for i, p in enumerate(prompts):
            ids = list(tok(p, add_special_tokens=False)["input_ids"])
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                    seed=None if seeds is None else int(seeds[i]), skip_special_tokens=True)
            requests.append(({"prompt_token_ids": ids}, params))
        for finished in self._run(requests):
            yield [(i, out.outputs[0].text.strip()) for i, out in finished]

    def capture(self, tokenizer, prompts: Sequence[str], responses: Sequence[str | None],
                layers: Sequence[int] | None = None, *, require_response: bool = False) -> Activations:
        """Pooled residuals of (prompt, response) pairs read inside vLLM, as ``steerlib.core.capture`` pools them.

        Args:
            tokenizer: the tokenizer the HF path uses (the same token boundary: ``tokenize_pairs``).
            prompts: formatted prompts.
            responses: the answers (None: prompt only).
            layers: residual-stream layers to keep (None: all, ``0..n_layers``).
            require_response: raise if a response tokenises to nothing.
        """
        from vllm import SamplingParams

        encoded = encode_samples(tokenizer, prompts, responses, require_response)
        requests = [({"prompt_token_ids": ids},
                     SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_KEY: p_len}))
                    for ids, p_len in encoded]
        keep = None if layers is None else sorted({int(x) for x in layers})
        n_layers = int(self._engine().llm_engine.model_config.hf_text_config.num_hidden_layers)
        if keep is not None and any(not 0 <= x <= n_layers for x in keep):
            raise ValueError(f"layers must be within 0..{n_layers}, got {list(layers)}")
        got: dict[int, dict[str, Any]] = {}
        for finished in self._run(requests, pop_captures=keep or True):
            got.update(finished)
        keep = list(range(len(got[0]["token_norms"]))) if keep is None else keep
        return activations_from_pooled([got[i] for i in range(len(encoded))], encoded, keep,
                                       meta={"backend": "vllm"})

    def _run(self, requests: list[tuple[dict, Any]],
             pop_captures: bool | list[int] = False) -> Iterator[list[tuple[int, Any]]]:
        """Add every request to the engine, step it, yield per step the ``(index, output)`` of the requests it
        finished (with ``pop_captures``: their pooled residuals instead, at those layers when it is a list, fetched
        from the worker once per step)."""
        engine = self._engine().llm_engine
        tag = uuid.uuid4().hex[:12]
        index = {f"{tag}-{i}": i for i in range(len(requests))}
        pending = set(index)
        try:
            for rid, (prompt, params) in zip(index, requests, strict=True):
                engine.add_request(rid, prompt, params)
            while pending:
                # Other callers' requests may share the engine's steps: only this call's are handled here.
                finished = [o for o in engine.step() if o.finished and o.request_id in index]
                if not finished:
                    continue
                ids = [o.request_id for o in finished]
                pending.difference_update(ids)
                if pop_captures is not False:
                    layers = pop_captures if isinstance(pop_captures, list) else None
                    popped = engine.collective_rpc("steerlib_pop_captures", args=(ids, layers))[0]
                    missing = [rid for rid in ids if rid not in popped]
                    if missing:
                        raise RuntimeError(f"steerlib: the worker returned no capture for request(s) {missing}")
                    yield [(index[rid], popped[rid]) for rid in ids]
                else:
                    yield [(index[o.request_id], o) for o in finished]
        finally:
            if pending:  # the consumer stopped early (or failed): free the engine for the next stage
                engine.abort_request(sorted(pending))

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
