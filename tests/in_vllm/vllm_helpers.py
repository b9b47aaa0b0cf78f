"""Helpers of the vLLM tests: the engine's settings and a way to run rows through it and collect what came back."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

TOKEN_BUDGET = 64  # tokens per vLLM step: prompts longer than this are prefilled in chunks
READOUT_LAYER = 12
# ``make test-vllm`` runs this folder on pytest-xdist workers (``--dist loadgroup``, scheduled by ``work_unit``):
# a work unit runs whole on one worker, so an engine it shares starts once. The tests on the session's engine
# (conftest's ``vllm_engine``; the collection checks the list) are one unit; every other file is one unit.
SESSION_GROUP = "vllm_engine"
ON_SESSION_ENGINE = ("test_vllm_capture_serve.py", "test_vllm_service.py", "test_vllm_steering.py",
                     "test_vllm_http.py::test_steerlib_serve_on_vllm",
                     "test_vllm_reliability.py::test_unknown_model_names_are_404_on_vllm",
                     "test_vllm_reliability.py::test_wrong_types_are_400_on_vllm",
                     "test_vllm_reliability.py::test_a_departed_non_streamed_clients_row_leaves_within_a_step_on_vllm")


# Work units by measured worker seconds, heaviest first (a full run on 2 workers, 2026-12-06): the session's
# unit (its engine's start and ~70 tests, ~300 s), the two parallel layouts' engines (~225 s), the slots' engine
# and its deliberate shutdown (~120 s), the pipeline's engine and extractions (~95 s), `vllm serve` (~65 s), the
# in-process replay engine (~35 s), the refused start (~33 s). xdist's own order (most tests first) put one-test
# units of a minute (`vllm serve`) after five-test units of seconds, and the other worker idled at the end. Units
# not listed follow in their usual order.
HEAVIEST_UNITS = (SESSION_GROUP, "test_vllm_layouts.py", "test_vllm_slots.py", "test_vllm_capture.py",
                  "test_vllm_http.py", "test_vllm_replay.py", "test_vllm_start.py")


def unit_rank(nodeid: str) -> int:
    """Where a test's work unit comes in ``HEAVIEST_UNITS`` (after all of them when not listed)."""
    unit = work_unit(nodeid)
    name = unit if unit == SESSION_GROUP else unit.rsplit("/", 1)[-1]
    return HEAVIEST_UNITS.index(name) if name in HEAVIEST_UNITS else len(HEAVIEST_UNITS)


def work_unit(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: ``SESSION_GROUP`` for the tests listed in ``ON_SESSION_ENGINE`` (a
    file, or a test of a file, any parameters), else its file."""
    path, _, rest = nodeid.partition("::")
    local = path.rsplit("/", 1)[-1] + ("::" + rest.split("[", 1)[0] if rest else "")
    if any(local == name or local.startswith(name + "::") for name in ON_SESSION_ENGINE):
        return SESSION_GROUP
    return path


@contextmanager
def own_core(env: MutableMapping[str, str] | None = None) -> Iterator[str | None]:
    """While a one-rank vLLM engine starts (its processes inherit ``env``, ``os.environ`` by default): under
    pytest-xdist, bind its worker's threads to this test worker's own core (gw0 the first, gw1 the second...).

    vLLM's automatic binding puts every one-rank engine's worker on the first core and keeps the others for its
    front-end, so the engines of two test workers would share one core while the other idles. Yields the value
    set (None outside xdist, or where the caller set a binding: that one is kept); afterwards ``env`` is as it was.
    Multi-rank layouts choose their own binding (``steerlib.vllm.layout.bound_cores``) and do not use this.
    """
    from steerlib.vllm.layout import BIND_ENV

    env = os.environ if env is None else env
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or env.get(BIND_ENV):
        yield None
        return
    cores = sorted(os.sched_getaffinity(0))
    env[BIND_ENV] = value = str(cores[int(worker[2:]) % len(cores)])
    try:
        yield value
    finally:
        env.pop(BIND_ENV, None)


class Collected:
    """What one row's sink received."""

    def __init__(self) -> None:
        self.text = ""
        self.values: list[list[float]] = []
        self.completion = None
        self.error = None
        self.done = threading.Event()

    def __call__(self, item: tuple) -> None:
        if item[0] == "token":
            self.text += item[1]
            self.values.extend(item[2])
        elif item[0] == "done":
            self.completion = item[1]
            self.done.set()
        else:
            self.error = item[1]
            self.done.set()


def run_rows(engine, rows, max_tokens: int = 10, timeout: float = 300.0):
    """Submit ``(prompt_ids, edits)`` rows together; return (row, Collected) per row once all are done."""
    from steerlib.serve.engine import Sampling

    out = []
    for ids, edits in rows:
        got = Collected()
        row = engine.submit(ids, edits, Sampling(max_tokens=max_tokens), got, steered=bool(edits))
        out.append((row, got))
    for _, got in out:
        assert got.done.wait(timeout), "a row did not finish"
        assert got.error is None, got.error
    return out


def streamed_readout(hf, layer: int, eos_ids: set[int]):
    """What a server streams for an HF generation: each token's paired value but EOS's, then the closing value."""
    import torch

    values = hf.token_projections(layer=layer).float()
    if hf.token_ids and hf.token_ids[-1] in eos_ids:
        return values[:-1]
    return torch.cat([values, hf.closing[hf.layers.index(layer), 0].float().reshape(1)])


class LentEngine:
    """The session's engine lent to an app: the app's shutdown must not stop it (it only unhooks the app)."""

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def stop(self, timeout: float = 30.0) -> None:
        self._engine.on_finish = None


# -- capture / replay harness (tests/in_vllm/test_vllm_replay.py) ----------------------------------------------

# What a step must not dispatch inside steerlib's ops once warmed up: a read back to the host, a copy across
# devices, or a fresh allocation (a captured graph would freeze the first, break on the second and replay the
# third at an address it does not own).
FACTORY_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "full", "full_like",
               "new_full", "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "scalar_tensor",
               "tensor", "lift_fresh", "lift_fresh_copy", "arange", "linspace", "rand", "randn", "randint")
# Python-level reads of a tensor's values by the host (``.tolist()`` reads memory without dispatching an op).
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def steerlib_op(func) -> bool:
    """Whether a dispatched op is one of steerlib's registered ops (whose bodies the harness records)."""
    return getattr(func, "namespace", "") in ("steerlib", "steerlib_vllm")


def make_recorder():
    """A ``TorchDispatchMode`` that records every op dispatched while it is active, as ``(func, args, kwargs, out,
    inside)``; ``inside`` is True for ops dispatched from within a steerlib op. A steerlib op is not recorded
    itself: its Python body runs under the recorder, so the record holds the kernels it launched, the way a CUDA
    graph holds kernels and not the Python that chose them."""
    from torch._library.custom_ops import _maybe_get_opdef
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchFunctionMode):
        """Notes every Python-level read of tensor values (``.tolist()``, ``.item()``, ``bool(t)``...)."""

        def __init__(self, sink: list[str]) -> None:
            super().__init__()
            self.sink = sink

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                self.sink.append(f"Tensor.{func.__name__}")
            return func(*args, **(kwargs or {}))

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple] = []
            self.host_reads: list[str] = []  # inside steerlib's ops
            self.depth = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if steerlib_op(func):
                self.depth += 1
                try:
                    with self, HostReads(self.host_reads):
                        return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
                finally:
                    self.depth -= 1
            out = func(*args, **kwargs)
            self.ops.append((func, args, kwargs, out, self.depth > 0))
            return out

    return Recorder()


def replay(ops: list[tuple], inputs: dict[int, object]):
    """Run a record again on the tensors it captured (by identity), the step's inputs swapped in by ``inputs``
    (id of a recorded input -> the live one); returns what the recorded forward returned, live."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_map

    env: dict[int, object] = dict(inputs)

    def live(x):
        return env.get(id(x), x) if isinstance(x, torch.Tensor) else x

    for func, args, kwargs, out, _ in ops:
        new = func(*tree_map(live, args), **tree_map(live, kwargs))
        for old, got in zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True):
            if isinstance(old, torch.Tensor):
                env[id(old)] = got
    return env


def signature(ops: list[tuple]) -> list[tuple]:
    """A record as data: each op's name and arguments, a tensor written as the op output it came from, or, for a
    tensor from outside (weights, KV cache, the plan's buffers, the runner's inputs), its address, shape and
    dtype. Two records with equal signatures launch the same kernels on the same memory."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_map

    produced: dict[int, tuple[int, int]] = {}
    sig = []

    def enc(x):
        if isinstance(x, torch.Tensor):
            return ("op", *produced[id(x)]) if id(x) in produced else ("ext", x.data_ptr(), tuple(x.shape), x.dtype)
        return x

    for k, (func, args, kwargs, out, inside) in enumerate(ops):
        sig.append((str(func), inside, tree_map(enc, args), tree_map(enc, kwargs)))
        for i, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor):
                produced[id(t)] = (k, i)
    return sig


def forbidden_in_step(ops: list[tuple]) -> list[str]:
    """Ops dispatched inside steerlib's ops that a graph cannot hold: host reads, cross-device copies, factories."""
    import torch

    bad = []
    for func, args, kwargs, _, inside in ops:
        if not inside:
            continue
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        if name == "_local_scalar_dense" or name in FACTORY_OPS:
            bad.append(str(func))
        elif name in ("_to_copy", "copy_", "to"):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors} | ({kwargs["device"]} if kwargs.get("device") else set())
            if len(devices) > 1:
                bad.append(f"{func} across {sorted(map(str, devices))}")
    return bad


def owned_tensors(obj, prefix: str = "", depth: int = 0,
                  skip: tuple[str, ...] = ("store", "_parsed", "slots")) -> dict:
    """Every tensor reachable from ``obj``'s attributes (dicts, lists and plain objects, a few levels deep), by
    path: the buffers a worker state and its plan own, whatever their layout. Skipped: model modules, and the
    host-side caches of parsed requests, stored read-outs and registered vector rows (``skip``: the slot table's
    CPU rows are copied into the plan's fixed device tables by ``set_rows``, between steps), which no forward
    reads."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if depth > 4 or isinstance(obj, torch.nn.Module | str | bytes | int | float | bool) or obj is None:
        return {}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__"):
        items = ((k, v) for k, v in vars(obj).items() if k not in skip)
    else:
        return {}
    out: dict = {}
    for key, value in items:
        out.update(owned_tensors(value, f"{prefix}.{key}", depth + 1, skip))
    return out


class Harness:
    """Wraps a vLLM runner's model call. Modes: ``"eager"`` (run, and keep the first record of each step size),
    ``"capture"`` (run and record, per step size), ``"replay"`` (run the captured record of the step's size
    instead of the model; a size never captured fails)."""

    def __init__(self, model) -> None:
        self.model = model
        self.original = model.forward
        self.mode = "eager"
        self.captured: dict[int, tuple[list[tuple], tuple]] = {}
        self.eager_records: dict[int, list[tuple]] = {}
        self.replayed: list[int] = []
        self.host_reads: list[str] = []  # host reads of tensor values inside steerlib's ops, every record
        model.forward = self.forward

    def remove(self) -> None:
        self.model.forward = self.original

    def forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        n = int(positions.shape[-1])
        call = dict(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                    inputs_embeds=inputs_embeds, **kwargs)
        if self.mode == "replay":
            if n not in self.captured:
                raise AssertionError(f"no record was captured for a step of {n} tokens")
            ops, (out, inputs) = self.captured[n]
            live = {id(old): new for old, new in zip(inputs, (input_ids, positions), strict=True)
                    if old is not None}
            self.replayed.append(n)
            return replay(ops, live).get(id(out), out)
        if self.mode == "capture" or n not in self.eager_records:
            rec = make_recorder()
            with rec:
                out = self.original(**call)
            self.host_reads.extend(rec.host_reads)
            if self.mode == "capture":
                self.captured.setdefault(n, (rec.ops, (out, (input_ids, positions))))
            else:
                self.eager_records[n] = rec.ops
            return out
        return self.original(**call)
