"""The pipeline's vLLM engine (``steerlib extract --engine vllm``, ``flag --baseline generate``): answers and
pooled activations from one in-process engine.

A stage hands the engine its whole job at once (``stream``): vLLM's scheduler admits requests as its KV memory
allows, and each answer is yielded the moment it finishes, so the caller's store writes it then (a killed job
loses only the answers in flight). Activations are read inside vLLM (``capture``, ``steerlib.vllm.capture``): each
(prompt, response) is one prefill-only request whose pooled residuals the worker reduces and returns, on the same
tokens the HF capture (``steerlib.core.capture``) pools, so no second copy of the model runs. A stage that will
capture its own answers asks ``stream(..., pool=True)``: the worker then pools each answer's residuals while it is
generated (prompt tokens in the prefill, each answer token in the decode step that feeds it), and a later
``capture`` of the same tokens reads those pools instead of a second prefill. Greedy decoding
gives the HF path's tokens on the embedded model (the tests compare them); sampled responses differ from HF's as
any two samplers' do.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from steerlib.core.capture import Activations, activations_from_pooled, encode_samples
from steerlib.core.pipeline import answers_in_order
from steerlib.vllm.capture import CAPTURE_KEY
from steerlib.vllm.layout import (
    VllmOptions,
    bound_cores,
    is_cpu,
    loadable_compile_cache,
    one_process,
    start_config,
)

__all__ = ["COMPILE_FROM_TOKENS", "VllmGenerator", "start_mode"]

# Generated tokens from which a compiled engine finishes a job sooner than an eager one (start + run), measured on
# the project's 2-core CPU machine with the embedded model (README, "The pipeline on vLLM"): in one process on both
# cores with torch's inductor cache warm, compiling adds ~24 s to the start and saves 0-0.28 ms per generated token
# (400 answers x 32 tokens: generate 70.8-74.4 s compiled, 74.3 s eager), so it pays from ~86,000-170,000 tokens.
# Below it the engine starts eager.
COMPILE_FROM_TOKENS = 100_000
# Pools of generated answers kept for a later ``capture`` (``stream(pool=True)``): 2 GiB holds ~9,800 answers of
# the embedded model at every layer (3 x 31 x 576 fp32 each), ~1,400 of a 32-layer 4096-wide one.
POOL_BYTES = 2 << 30
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
        # Pools of answers generated with ``pool=True``, by their exact (prompt ids, answer ids), oldest first.
        # Each entry: (the pools, their size in bytes).
        self._pools: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], tuple[dict[str, Any], int]] = OrderedDict()
        self._pool_bytes = 0
        self.pool_hits = 0  # samples ``capture`` read from those pools (no prefill)

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
        if is_cpu() and "enable_chunked_prefill" not in kwargs and "max_num_batched_tokens" not in kwargs:
            # See ``_check_seedable``: whole prompts per step, so seeded sampling works on the CPU build.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(config.model_config.max_model_len),
                                                   int(config.scheduler_config.max_num_batched_tokens))
        world = config.parallel_config.world_size
        with bound_cores(world, whole_machine=True), one_process(world, kwargs), loadable_compile_cache():
            self._llm = LLM(**kwargs)

    def _engine(self) -> Any:
        self.start()
        return self._llm

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        return answers_in_order(self, prompts, max_new_tokens, temperature, seed)

    def stream(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
               seeds: Sequence[int] | None = None, *, pool: bool = False) -> Iterator[list[tuple[int, str]]]:
        """Submit every prompt at once; yield, after each engine step that finished some, their ``(index, text)``.

        ``seeds[i]`` is prompt ``i``'s sampling seed (per prompt, so a resumed job draws the same answers).
        ``pool``: also pool each answer's residuals while it is generated, for a later ``capture`` of the same
        (prompt, answer) to read. The request then asks one token more than ``max_new_tokens`` (the answer keeps
        ``max_new_tokens``): a token's residual is computed in the step that feeds it, so the last kept token must
        be fed once more; seeded sampling draws the same first ``max_new_tokens`` tokens either way.
        Closing the iterator early aborts the requests still in flight."""
        from vllm import SamplingParams

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self.start(len(prompts) * max_new_tokens)
        if seeds is not None and temperature > 0:
            _check_seedable(self._llm.llm_engine.vllm_config)
        tok = self._llm.get_tokenizer()
        requests, prompt_ids = [], []
        for i, p in enumerate(prompts):
            ids = list(tok(p, add_special_tokens=False)["input_ids"])
            extra = {CAPTURE_KEY: len(ids)} if pool else None
            params = SamplingParams(max_tokens=max_new_tokens + int(pool), temperature=temperature,
                                    seed=None if seeds is None else int(seeds[i]), skip_special_tokens=True,
                                    extra_args=extra)
            requests.append(({"prompt_token_ids": ids}, params))
            prompt_ids.append(ids)
        for finished in self._run(requests, pop_captures=pool):
            answers = []
            for i, out, pooled in finished:
                text, token_ids = _answer(tok, out.outputs[0], max_new_tokens)
                if pooled is not None:
                    self._remember(prompt_ids[i], token_ids, pooled)
                answers.append((i, text))
            yield answers

    def _remember(self, prompt_ids: list[int], token_ids: list[int], pooled: dict[str, Any]) -> None:
        """Keep an answer's pools under the tokens they pooled (the answer tokens its decode steps fed)."""
        fed = tuple(token_ids[: int(pooled["response_tokens"])])
        if int(pooled["prompt_tokens"]) != len(prompt_ids) or not fed:
            return  # not the tokens this request was given (cannot happen with a salted cache): never read it
        key = (tuple(prompt_ids), fed)
        size = sum(v.numel() * v.element_size() for v in pooled.values() if hasattr(v, "numel"))
        old = self._pools.pop(key, None)
        if old is not None:
            self._pool_bytes -= old[1]
        self._pools[key] = (pooled, size)
        self._pool_bytes += size
        while self._pool_bytes > POOL_BYTES and self._pools:
            self._pool_bytes -= self._pools.popitem(last=False)[1][1]

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
        keep = None if layers is None else sorted({int(x) for x in layers})
        n_layers = int(self._engine().llm_engine.model_config.hf_text_config.num_hidden_layers)
        if keep is not None and any(not 0 <= x <= n_layers for x in keep):
            raise ValueError(f"layers must be within 0..{n_layers}, got {list(layers)}")
        rows: list[dict[str, Any] | None] = []
        for ids, p_len in encoded:  # answers pooled while they were generated: the same tokens, read, not rerun
            got = self._pools.get((tuple(ids[:p_len]), tuple(ids[p_len:])))
            rows.append(None if got is None else {k: v[keep] if keep is not None and hasattr(v, "numel") else v
                                                  for k, v in got[0].items()})
        todo = [i for i, row in enumerate(rows) if row is None]
        self.pool_hits += len(encoded) - len(todo)
        requests = [({"prompt_token_ids": encoded[i][0]},
                     SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_KEY: encoded[i][1]}))
                    for i in todo]
        for finished in self._run(requests, pop_captures=keep or True):
            for k, _out, pooled in finished:
                rows[todo[k]] = pooled
        keep = list(range(n_layers + 1)) if keep is None else keep
        return activations_from_pooled(rows, encoded, keep, meta={"backend": "vllm"})

    def _run(self, requests: list[tuple[dict, Any]],
             pop_captures: bool | list[int] = False) -> Iterator[list[tuple[int, Any, dict[str, Any] | None]]]:
        """Add every request to the engine, step it, yield per step the ``(index, output, pools)`` of the requests
        it finished; with ``pop_captures`` their pooled residuals (CPU tensors, at those layers when it is a list)
        are fetched from the worker once per step, else ``pools`` is None."""
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
                popped: dict[str, Any] = {}
                if pop_captures is not False:
                    layers = pop_captures if isinstance(pop_captures, list) else None
                    popped = engine.collective_rpc("steerlib_pop_captures", args=(ids, layers, True))[0]
                    missing = [rid for rid in ids if rid not in popped]
                    if missing:
                        raise RuntimeError(f"steerlib: the worker returned no capture for request(s) {missing}")
                yield [(index[o.request_id], o, popped.get(o.request_id)) for o in finished]
        finally:
            if pending:  # the consumer stopped early (or failed): free the engine for the next stage
                engine.abort_request(sorted(pending))

    def clear_pools(self) -> None:
        """Forget the pools of answers generated with ``pool=True`` (a later ``capture`` prefills them again)."""
        self._pools.clear()
        self._pool_bytes = 0

    def close(self) -> None:
        self.clear_pools()
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None


def _answer(tokenizer, completion: Any, max_new_tokens: int) -> tuple[str, list[int]]:
    """An answer's text and generated token ids, cut to ``max_new_tokens`` (a pooling request asks one more)."""
    ids = list(completion.token_ids)
    if len(ids) <= max_new_tokens:
        return completion.text.strip(), ids
    ids = ids[:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


def _check_seedable(config: Any) -> None:
    """Refuse seeded sampling where vLLM 0.32 cannot do it: on the CPU build a prompt prefilled in chunks has the
    sample of each partial step discarded by rewinding its request's generator (``gen.set_offset``), which a CPU
    ``torch.Generator`` does not support ("CPU Generator does not use offset", raised inside the engine step).
    ``VllmGenerator`` therefore starts CPU engines with chunked prefill off unless the caller chose a budget."""
    if is_cpu() and config.scheduler_config.enable_chunked_prefill:
        raise ValueError("seeded sampling on vLLM's CPU build needs whole-prompt prefill: start the engine with "
                         "enable_chunked_prefill=False and max_num_batched_tokens >= max_model_len (the CPU "
                         "generator cannot be rewound after a chunked prefill step), or sample greedily")
