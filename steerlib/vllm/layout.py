"""Which vLLM engine layouts steering is right under, and the engine arguments steerlib starts vLLM with.

``VllmOptions`` is what ``steerlib serve --engine vllm`` (and the offline generator) hands to vLLM's
``EngineArgs``, under vLLM's own names; building it checks types and ranges. ``check_layout`` is the one rule
set over the ``VllmConfig`` vLLM resolved from those arguments (after its platform adjusted them), called by
steerlib's engine builders before anything starts and by the plugin in every worker before the model loads, so
``vllm serve`` and ``LLM(...)`` users get the same refusal:

=============================  ===========================================================================
layout                         behaviour
=============================  ===========================================================================
tensor parallel (any size)     right: every rank holds the whole residual stream after the all-reduce
pipeline parallel              right: a layer's edit and read-out run on the stage that owns the layer;
                               on the CPU build only with compilation on (vLLM 0.32's eager PP fails in
                               the second stage's worker, so it is refused)
data parallel > 1              refused: each engine's read-outs stay in its own workers
speculative decoding           refused: verified draft tokens would carry one read-out per step
context / sequence parallel    refused: a rank sees a slice of the tokens the plan maps per request
dual-batch overlap (DBO)       refused: the plan covers the whole step, not one micro-batch (vLLM's CPU
                               build turns DBO off itself; then nothing is refused)
V2 model runner                refused: its per-request bookkeeping lives elsewhere (vLLM's CPU build
                               refuses V2 itself without Triton)
=============================  ===========================================================================

Importing this module does not import vLLM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from steerlib.vllm.slots import CAPACITY_KEY

__all__ = ["AOT_COMPILE_ENV", "BIND_ENV", "UnsupportedLayout", "VllmOptions", "bound_cores", "check_layout",
           "core_binding", "is_cpu", "loadable_compile_cache", "one_process", "parse_engine_arg", "start_config"]

log = logging.getLogger("steerlib.vllm")

# vLLM's CPU build binds each worker's OpenMP threads from this variable; its default ("auto", one NUMA node
# per worker) refuses to start TP/PP on a single-node machine.
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"

# Engine arguments steerlib itself sets: the worker extension the server reads read-outs through and the
# compile-cache identity of the hooks. A user-given value would break steering, so it is refused.
_OWNED = ("model", "additional_config", "worker_extension_cls")


class UnsupportedLayout(ValueError):
    """A vLLM layout steering is not right under (raised before the model loads)."""


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine arguments, by vLLM's names (``vllm.engine.arg_utils.EngineArgs`` fields).

    Attributes:
        tensor_parallel_size, pipeline_parallel_size, data_parallel_size: vLLM's parallel layout.
        max_num_seqs: requests in one step (default: the server's ``--max-batch``).
        max_model_len: context limit (default: the model's).
        max_num_batched_tokens: tokens in one step (longer prompts are prefilled in chunks).
        enforce_eager: no torch.compile / CUDA graphs (starts faster).
        gpu_memory_utilization: vLLM's memory fraction (on the CPU build: of the machine's memory).
        enable_prefix_caching: reuse KV blocks of shared prefixes (steering salts the cache, so it stays right).
        dtype: the weights' dtype in vLLM.
        seed: vLLM's sampling seed.
        max_steer_vectors: steering vector rows each worker keeps registered (``steerlib.vllm.slots``; LRU,
            default 256), passed in ``additional_config``.
        extra: any other ``EngineArgs`` field by name (``--vllm-arg NAME=VALUE``), e.g. ``speculative_config``.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    dtype: str = "float32"
    seed: int | None = None
    max_steer_vectors: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.max_steer_vectors is not None:
            _check_int("max_steer_vectors", self.max_steer_vectors, minimum=1)
        gmu = self.gpu_memory_utilization
        if gmu is not None and not (isinstance(gmu, int | float) and math.isfinite(gmu) and 0 < gmu <= 1):
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gmu!r}")
        if not isinstance(self.dtype, str) or not self.dtype:
            raise ValueError(f"--dtype must be a dtype name, got {self.dtype!r}")
        named = {f.name for f in fields(self) if f.name != "extra"}
        for key in self.extra:
            flag = "--" + key.replace("_", "-")
            if key in _OWNED:
                raise ValueError(f"--vllm-arg {key}: steerlib sets {key} itself (steering needs its own value)")
            if key in named:
                raise ValueError(f"--vllm-arg {key}: use {flag} instead")
            if not key.isidentifier():
                raise ValueError(f"--vllm-arg {key!r}: not an engine argument name")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def world_size(self) -> int:
        """Worker processes of one engine (tensor x pipeline ranks)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_args(self, model: str, *, max_num_seqs: int | None = None) -> dict[str, Any]:
        """Keyword arguments of ``EngineArgs`` / ``AsyncEngineArgs`` / ``LLM`` for ``model`` (a local folder):
        these options plus the worker extension and the hooks' compile-cache identity. ``max_num_seqs`` is the
        caller's default for the field (a server's batch size; None: vLLM's own)."""
        from steerlib.vllm.worker import IDENTITY

        args: dict[str, Any] = {
            "model": str(model), "dtype": self.dtype, "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "additional_config": {"steerlib": IDENTITY},
            "worker_extension_cls": "steerlib.vllm.worker.SteerlibWorkerExtension",
        }
        seqs = self.max_num_seqs if self.max_num_seqs is not None else max_num_seqs
        if seqs is not None:
            args["max_num_seqs"] = seqs
        for name in ("max_model_len", "max_num_batched_tokens", "gpu_memory_utilization", "seed"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        if self.max_steer_vectors is not None:
            args["additional_config"][CAPACITY_KEY] = self.max_steer_vectors
        if self.world_size > 1:  # worker processes, not Ray: nothing else is needed on one machine
            args["distributed_executor_backend"] = "mp"
        args.update(self.extra)
        return args

    @classmethod
    def from_engine_args(cls, args: Mapping[str, Any]) -> VllmOptions:
        """The options of an engine-argument mapping (fields by name, the rest as ``extra``); the inverse of
        ``engine_args`` less what steerlib sets itself (given, it is refused)."""
        names = {f.name for f in fields(cls) if f.name != "extra"}
        known = {k: v for k, v in args.items() if k in names}
        extra = {k: v for k, v in args.items() if k not in names}
        return cls(**known, extra=extra)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")


def parse_engine_arg(item: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (name, value): the value as JSON when it parses (numbers, booleans, objects), else the
    string itself. ``max-loras`` and ``max_loras`` name the same argument."""
    name, sep, raw = item.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--vllm-arg {item!r}: expected NAME=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip().lstrip("-").replace("-", "_"), value


def check_layout(config: Any) -> None:
    """Raise ``UnsupportedLayout`` naming every layout of ``config`` (a ``vllm.config.VllmConfig``) that steering
    is not right under; see the module's table."""
    par = config.parallel_config
    problems: list[str] = []
    if par.data_parallel_size > 1:
        problems.append(f"data parallel ({par.data_parallel_size} engines): each engine's trait read-outs stay "
                        "in its own workers; run one engine per server (--data-parallel-size 1)")
    if config.speculative_config is not None:
        problems.append("speculative decoding: a step verifies several draft tokens per request and the "
                        "read-out keeps one; start vLLM without --speculative-config")
    if par.decode_context_parallel_size > 1 or par.prefill_context_parallel_size > 1:
        problems.append("context (sequence) parallel: a rank holds a slice of the step's tokens, not the rows "
                        "the steering plan maps; use --decode/--prefill-context-parallel-size 1")
    if getattr(par, "enable_hc_sp", False) or getattr(par, "use_sequence_parallel_moe", False):
        problems.append("sequence parallel: a rank holds a slice of the step's tokens, not the rows the "
                        "steering plan maps")
    if par.use_ubatching:
        problems.append("dual-batch overlap (micro-batching): the steering plan covers the whole step, not one "
                        "micro-batch; start vLLM without --enable-dbo / --ubatch-size")
    if config.use_v2_model_runner:
        problems.append("vLLM's V2 model runner: steerlib reads the V1 runner's per-request bookkeeping; set "
                        "VLLM_USE_V2_MODEL_RUNNER=0")
    if par.pipeline_parallel_size > 1 and is_cpu() and _compilation_off(config):
        problems.append("pipeline parallel with compilation off on vLLM's CPU build: vLLM 0.32 fails in the "
                        "second stage's worker (its intermediate tensors are allocated only while compiling); "
                        "drop --enforce-eager (or run --pipeline-parallel-size 1)")
    if problems:
        raise UnsupportedLayout("steerlib cannot steer this vLLM layout: " + "; ".join(problems))


def _compilation_off(config: Any) -> bool:
    mode = getattr(config.compilation_config, "mode", None)
    return bool(config.model_config.enforce_eager) or mode is None or int(getattr(mode, "value", mode)) == 0


def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def core_binding(world_size: int, cpus: Sequence[int]) -> str:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value giving each of ``world_size`` workers its own cores: the allowed
    cores split into contiguous groups, or, with fewer cores than workers, one core each in turn."""
    cores = sorted(cpus)
    if world_size < 1 or not cores:
        raise ValueError(f"cannot bind {world_size} workers to cores {list(cpus)}")
    if len(cores) < world_size:
        groups = [[cores[i % len(cores)]] for i in range(world_size)]
    else:
        size, rest = divmod(len(cores), world_size)
        groups, start = [], 0
        for rank in range(world_size):
            end = start + size + (1 if rank < rest else 0)
            groups.append(cores[start:end])
            start = end
    return "|".join(",".join(str(c) for c in g) for g in groups)


@contextlib.contextmanager
def bound_cores(world_size: int, environ: MutableMapping[str, str] | None = None, *,
                whole_machine: bool = False) -> Iterator[str | None]:
    """While starting vLLM: give its CPU workers a core binding when there are several and the user set none
    (vLLM's automatic binding wants one NUMA node per worker and refuses to start otherwise). Yields the value set
    (or None). vLLM's processes inherit it when they are spawned, inside the block; afterwards the variables are as
    they were, so a later engine of another size in this process does not inherit a binding of the wrong length.

    ``whole_machine``: a single CPU worker gets every allowed core too. vLLM's automatic binding keeps one core
    per worker for its scheduler process (on 2 cores: the model runs on 1); a batch job that owns the machine
    (``steerlib.vllm.offline``) wants them all, the scheduler being idle while the worker steps.
    """
    env = os.environ if environ is None else environ
    if world_size < 1 or (world_size == 1 and not whole_machine) or env.get(BIND_ENV) or not is_cpu():
        yield None
        return
    value = core_binding(world_size, sorted(os.sched_getaffinity(0)))
    added = {BIND_ENV: value}
    if world_size == 1:
        added[RESERVED_ENV] = "0"
    added = {k: v for k, v in added.items() if k not in env}
    env.update(added)
    log.info("vLLM CPU workers bound to cores %s (%s)", value, BIND_ENV)
    try:
        yield value
    finally:
        for key in added:
            env.pop(key, None)


AOT_COMPILE_ENV = "VLLM_USE_AOT_COMPILE"


@contextlib.contextmanager
def loadable_compile_cache(environ: MutableMapping[str, str] | None = None) -> Iterator[bool]:
    """While starting vLLM on the CPU build: compile through plain ``torch.compile`` (``VLLM_USE_AOT_COMPILE=0``),
    unless the user chose. vLLM 0.32 with torch >= 2.10 saves an AOT-compiled model that its CPU build cannot load
    back ("Compiling model again due to a load failure ... 'function' object has no attribute
    'finalize_loading'"), so every compiled start compiled from scratch; torch's own inductor cache loads.
    Measured on 2 cores, the embedded model's serving settings: 136 s per compiled start before, 52 s from the
    second start on (119 s the first). Yields whether it set the variable; spawned processes inherit it."""
    env = os.environ if environ is None else environ
    if AOT_COMPILE_ENV in env or not is_cpu():
        yield False
        return
    env[AOT_COMPILE_ENV] = "0"
    try:
        yield True
    finally:
        env.pop(AOT_COMPILE_ENV, None)


MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def one_process(world_size: int, args: MutableMapping[str, Any],
                environ: MutableMapping[str, str] | None = None) -> Iterator[bool]:
    """While starting an offline ``LLM``: a single CPU worker runs in this process (no engine-core or worker
    process: one import of vLLM, no busy-waiting reader on a core the model needs, no serialisation of what the
    worker returns). Sets ``distributed_executor_backend="uni"`` in ``args`` and turns vLLM's V1 multiprocessing
    off for the start, unless the user chose either. Yields whether it did. Measured on 2 cores, 160 prompts x 32
    tokens then their pooled capture, eager: 69.7 s in one process against 100.0 s in three (start 11.3 s vs 39.2 s).
    """
    env = os.environ if environ is None else environ
    if world_size != 1 or not is_cpu() or MULTIPROCESSING_ENV in env or "distributed_executor_backend" in args:
        yield False
        return
    args["distributed_executor_backend"] = "uni"
    env[MULTIPROCESSING_ENV] = "0"
    try:
        yield True
    finally:
        env.pop(MULTIPROCESSING_ENV, None)


def start_config(args: Mapping[str, Any], *, asynchronous: bool = True) -> Any:
    """vLLM's resolved ``VllmConfig`` for these engine arguments, checked against the layouts steering is right
    under (``check_layout``: a clear error before any worker starts). Start the engine inside
    ``bound_cores(config.parallel_config.world_size)``."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    config = (AsyncEngineArgs if asynchronous else EngineArgs)(**args).create_engine_config()
    check_layout(config)
    return config
