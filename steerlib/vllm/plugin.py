"""The vLLM general plugin (entry point ``vllm.general_plugins``: ``steerlib = steerlib.vllm.plugin:register``).

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), possibly more than
once; it is idempotent. It wraps three public methods, each checked to exist (a vLLM without them fails here,
loudly, instead of serving unsteered text):

* ``InputProcessor.process_inputs`` (API process): parses a request's steering spec with the model's shape, so
  a bad spec is a 400 there and never reaches (and crashes) a worker, registers its vectors (each row written
  once to the engine's content-addressed store) and rewrites the spec to carry keys, and salts the prefix cache
  with the steering (``cache_salt``), keeping any salt the client gave.
  It also pins the request's vector keys in the engine's admission table (``steerlib.vllm.slots``, the workers'
  capacity and policy) and refuses it with a 4xx when every slot is pinned by requests still in flight, so a
  worker's table never overflows.
* ``OutputProcessor.add_request`` (API process): notes the output processor, whose requests in flight are the
  ones whose vectors stay pinned.
* ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (workers): chooses and builds the steering kernel
  (``steerlib.kernels.prepare_backend``, the same on every rank) and hooks the decoder layers right after the
  model loads, before vLLM compiles or warms it up.
* ``GPUModelRunner._model_forward`` (workers; the runner's documented override point): fills the step plan
  before the forward and checks afterwards that every steered layer ran.
* ``Worker.load_model`` (workers, whatever runner they built; the CPU worker inherits it): refuses, before the
  model loads, every engine layout steering is not right under (``steerlib.vllm.layout.check_layout``: data
  parallel, speculative decoding, context/sequence parallel, DBO, the V2 runner, eager pipeline parallel on the
  CPU build). The refusal reads vLLM's resolved config, so it cannot be skipped by a module that fails to import.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
import weakref
from typing import Any

log = logging.getLogger("steerlib.vllm")

__all__ = ["register"]

_REGISTERED = False


def _wrap(cls: type, name: str, make) -> None:
    original = cls.__dict__.get(name)
    if original is None:
        raise RuntimeError(f"steerlib: {cls.__module__}.{cls.__name__}.{name} is missing; this vLLM version is not "
                           "supported by steerlib's plugin")
    if getattr(original, "_steerlib_wrapped", False):
        return
    wrapped = functools.wraps(original)(make(original))
    wrapped._steerlib_wrapped = True
    setattr(cls, name, wrapped)


def _salted(existing: str | None, salt: str) -> str:
    return salt if not existing else f"{existing[:60]}-{salt}"[:128]


def _process_inputs(original):
    def process_inputs(self, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any):
        from steerlib.vllm.capture import CAPTURE_KEY, check_boundary
        from steerlib.vllm.slots import SlotsExhausted
        from steerlib.vllm.spec import SPEC_KEY, cache_salt, register_spec, spec_keys

        extra = getattr(params, "extra_args", None) or {}
        spec = extra.get(SPEC_KEY)
        if spec is not None:
            if not isinstance(spec, str):
                raise _validation_error(f"{SPEC_KEY} must be a JSON string (vllm_xargs take str/int/float/list)")
            cfg = self.model_config
            store, admission = _registry(self)
            try:
                # Registration: every row is written to the store once; the request carries keys from here on.
                # Layers are counted over all pipeline stages.
                spec, _ = register_spec(spec, cfg.get_total_num_hidden_layers(), cfg.get_hidden_size(), store)
            except ValueError as exc:
                raise _validation_error(str(exc)) from None
            params.extra_args[SPEC_KEY] = spec
        capture = extra.get(CAPTURE_KEY)
        if capture is not None:
            try:
                check_boundary(capture)
            except ValueError as exc:
                raise _validation_error(str(exc)) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if capture is not None:  # every prompt token must be computed, never read from another request's cache
            request.cache_salt = _salted(request.cache_salt, f"steerlib-capture-{uuid.uuid4().hex}")
        keys = spec_keys(spec) if spec is not None else []
        if keys:
            admission.release_missing(_Live())
            try:
                admission.acquire(request_id, keys)
            except SlotsExhausted as exc:
                raise _slots_error(str(exc)) from None
            _ADMITTED[request_id] = time.monotonic()
        salt = cache_salt(spec) if spec is not None else None
        if salt is not None:
            request.cache_salt = _salted(request.cache_salt, salt)
        return request
    return process_inputs


def _registry(processor: Any) -> tuple[Any, Any]:
    """An engine's vector store and admission table (the API process's side of registered vectors), kept on its
    input processor: the workers' tables hold the rows; this one counts keys and pins, with the same capacity
    and policy, so that no worker is ever handed more pinned vectors than it holds."""
    got = getattr(processor, "_steerlib_registry", None)
    if got is None:
        from steerlib.vllm.slots import SlotTable, capacity_of, store_of

        additional = processor.vllm_config.additional_config
        got = (store_of(additional, cache=1024), SlotTable(capacity_of(additional)))
        processor._steerlib_registry = got
    return got


# Output processors of this process (each tracks its engine's requests in flight by their client-given id) and
# the steered requests admitted but not yet handed to one: a request counts as in flight from admission until its
# output processor stops tracking it (the grace covers the moment between ``process_inputs`` and ``add_request``,
# and frees the pins of a request refused in between).
_PROCESSORS: weakref.WeakSet = weakref.WeakSet()
_ADMITTED: dict[str, float] = {}
_GRACE_S = 30.0


def _track(original):
    def add_request(self, request: Any, *args: Any, **kwargs: Any):
        _PROCESSORS.add(self)
        out = original(self, request, *args, **kwargs)
        _ADMITTED.pop(getattr(request, "external_req_id", None), None)  # tracked from here on: no grace needed
        return out
    return add_request


class _Live:
    """Request ids (as given to ``process_inputs``) still in flight in this process."""

    def __init__(self) -> None:
        self._now = time.monotonic()

    def __contains__(self, request_id: object) -> bool:
        if any(request_id in p.external_req_ids for p in list(_PROCESSORS)):
            return True
        if self._now - _ADMITTED.get(request_id, -math.inf) < _GRACE_S:  # type: ignore[arg-type]
            return True
        _ADMITTED.pop(request_id, None)  # type: ignore[arg-type]
        return False


@functools.cache
def _slots_full() -> type:
    from steerlib.vllm.slots import SlotsExhausted

    return type("SlotsFull", (type(_validation_error("")), SlotsExhausted), {})


def _slots_error(message: str) -> Exception:
    """A client error (vLLM answers 400) that is also a ``SlotsExhausted`` (steerlib's server answers 429)."""
    return _slots_full()(message)


def _validation_error(message: str) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # pragma: no cover - older layouts
        return ValueError(message)
    return VLLMValidationError(message)


def _load_model(original):
    def load_model(self, *args: Any, **kwargs: Any):
        from steerlib.vllm.worker import install

        out = original(self, *args, **kwargs)
        _prepare_kernels(self)
        install(self)
        return out
    return load_model


def _prepare_kernels(runner: Any) -> None:
    """Choose and build the steering kernel now, before warm-up and capture, and check every rank chose the same."""
    from vllm.distributed.parallel_state import get_world_group

    from steerlib.kernels import prepare_backend

    prepare_backend(runner.device, group=get_world_group().cpu_group)


def _model_forward(original):
    def model_forward(self, *args: Any, **kwargs: Any):
        from steerlib.vllm.worker import state

        st = state()
        if st is None:
            raise RuntimeError("steerlib: a vLLM step ran on a model the plugin did not hook")
        positions = kwargs.get("positions")
        if positions is None and len(args) > 1:
            positions = args[1]
        st.begin(self, positions)
        try:
            out = original(self, *args, **kwargs)
        finally:
            st.in_step = False
        st.end()
        return out
    return model_forward


def _check_layout(original):
    def load_model(self, *args: Any, **kwargs: Any):
        from steerlib.vllm.layout import check_layout

        check_layout(self.vllm_config)  # before the weights load: a refusal costs seconds, not minutes
        return original(self, *args, **kwargs)
    return load_model


def register() -> None:
    """Install steerlib's wrappers in this vLLM process (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(Worker, "load_model", _check_layout)
    _wrap(OutputProcessor, "add_request", _track)
    _wrap(GPUModelRunner, "load_model", _load_model)
    _wrap(CPUModelRunner, "load_model", _load_model)
    _wrap(GPUModelRunner, "_model_forward", _model_forward)
    _REGISTERED = True
    log.info("steerlib vLLM plugin registered")
