"""Steering the residual stream during any forward pass, with per-token trait read-out.

``steer(model, vectors, layers, coef)`` is a context manager: inside it every forward pass (``model(...)``,
``model.generate``, a training step) adds ``coef * v`` at the chosen layers, ablates ``v``, or caps the
projection on ``v``. The edit and the trait read-out happen in one fused op
(``steerlib.kernels.fused_steer_project``: Triton/CUDA on GPU, torch on CPU).

Positions are absolute: a forward pass that starts with an empty KV cache is the prefill and its tokens
are the prompt; tokens fed later (decoding with a cache) are the response. So ``positions="response"``
steers exactly the generated tokens, with or without caching.

Steering at layer ``L`` (1..n_layers) edits the output of block ``L - 1``, i.e. ``output_hidden_states[L]``
(for the last layer, before the final norm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from steerlib.core.arch import Layout, get_layout
from steerlib.core.checks import check_choice, check_number
from steerlib.core.compat import find_cache, past_length
from steerlib.core.hooks import HookHandles
from steerlib.core.loading import load_vectors, pick_layer, resolve_vector
from steerlib.core.vectors import TraitVectors, VectorSource, check_vector

# steerlib.kernels is the top-level kernels/ folder, installed under this name (pyproject.toml package-dir).
from steerlib.kernels import fused_steer_project
from steerlib.steering.thread_guard import owner_thread_only

Mode = Literal["add", "ablate", "cap"]
Positions = Literal["all", "prompt", "response"]

MODES = ("add", "ablate", "cap")
POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class SteerOp:
    """One edit at one layer.

    Attributes:
        layer: residual-stream layer, 1..n_layers.
        vector: [d_model] direction (any norm; ``add`` uses it as given, ``ablate``/``cap`` its unit version).
        mode: "add" (h + coef * v), "ablate" (remove the component along v), "cap" (clamp <h, v/|v|>).
        coef: scale for ``add``.
        cap_min: lower bound of the projection for ``cap`` (None: unbounded).
        cap_max: upper bound of the projection for ``cap`` (None: unbounded).
        positions: which tokens the edit touches.
    """

    layer: int
    vector: Tensor
    mode: Mode = "add"
    coef: float = 1.0
    cap_min: float | None = None
    cap_max: float | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}; choose from {MODES}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose from {POSITIONS}")
        if self.mode == "cap" and self.cap_min is None and self.cap_max is None:
            raise ValueError("mode 'cap' needs cap_min and/or cap_max")
        check_number(self.coef, f"steering coefficient at layer {self.layer}")
        for name in ("cap_min", "cap_max"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name)
        check_vector(self.vector, name=f"steering vector at layer {self.layer}")


class _PositionTracker:
    """Knows, for the current forward pass, where each token sits relative to the prompt.

    A forward pre-hook on the decoder body reads how many tokens the KV cache already holds before any block
    runs (the cache is found by type, not by keyword: see ``steerlib.core.compat``). An empty cache means a
    prefill (all prompt); a non-empty one means decoding (all response). When the split cannot be
    established, steering restricted to "prompt" or "response" raises instead of guessing.
    """

    def __init__(self) -> None:
        self.past_len: int | None = 0
        self.seq_len = 0

    def pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.seq_len = int(x.shape[1]) if isinstance(x, Tensor) else 0
        past = past_length(args, kwargs)
        if past == 0 and find_cache(args, kwargs) is None:
            # No cache object was found. If the position ids run past this pass's length, tokens came
            # before it: the cache is being passed in a way this version of steerlib does not recognise.
            position_ids = kwargs.get("position_ids")
            if isinstance(position_ids, Tensor) and position_ids.numel() and int(position_ids.max()) >= self.seq_len:
                past = None
        self.past_len = past

    def in_prompt(self) -> bool:
        """Whether the current pass is the prefill; raises if that cannot be told."""
        if self.past_len is None:
            raise RuntimeError(
                "cannot tell prompt from response tokens in this forward pass: no KV cache was found among "
                "the decoder's inputs (generation with use_cache=False, or an unrecognised transformers "
                "interface); use positions='all' or generate with a KV cache"
            )
        return self.past_len == 0

    def applies(self, positions: str) -> bool:
        """Whether an edit restricted to ``positions`` touches the tokens of the current pass."""
        if positions == "all":
            return True
        return self.in_prompt() == (positions == "prompt")


@dataclass
class TraitReadout:
    """Per-token projections on unit trait directions, recorded while steering hooks are installed.

    (A read-out, not a monitor: "monitor" in steerlib means the drift monitor, ``DriftMonitor``.)

    ``records[layer]`` is a list with one tensor [batch, seq, K] per forward pass (K = len(names)).
    """

    names: list[str]
    layers: list[int]
    directions: dict[int, Tensor]  # layer -> [K, d_model] unit rows
    records: dict[int, list[Tensor]] = field(default_factory=dict)

    def clear(self) -> None:
        self.records = {layer: [] for layer in self.layers}

    def stacked(self, layer: int) -> Tensor:
        """All positions seen so far at ``layer``, concatenated over forward passes: [batch, seq_total, K]."""
        recs = self.records.get(layer) or []
        if not recs:
            raise ValueError(f"nothing recorded at layer {layer} yet")
        return torch.cat([r.float().cpu() for r in recs], dim=1)


def _unit_rows(vectors: Sequence[Tensor]) -> Tensor:
    stacked = torch.stack([v.float() for v in vectors])
    return stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ResidualEditor:
    """Installs steering ops and a trait read-out as hooks; use as a context manager.

    Hooks are global state on the model: while the context is open, every forward pass of that model, from
    any thread, is steered.

    All hooks are registered before the body runs, or none are; they are removed in reverse order when
    the context exits, also when the body raises.
    """

    def __init__(self, model: nn.Module, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None):
        self.model = model
        self.layout: Layout = get_layout(model)
        self.ops = list(ops)
        self.readout = readout
        self.positions = _PositionTracker()
        self._handles = HookHandles()
        device = next(model.parameters()).device
        self._plans: dict[int, list[dict]] = {}
        for op in self.ops:
            layer = self.layout.check_layer(op.layer, allow_embeddings=False)
            check_vector(op.vector, self.layout.d_model, name=f"steering vector at layer {layer}")
            vec = op.vector.detach().to(device=device, dtype=torch.float32)
            unit = vec / vec.norm()
            # Precompute everything a hook needs, so nothing is allocated on the decode path.
            if op.mode == "add":
                plan = {"steer_vec": vec, "alpha": float(op.coef)}
            elif op.mode == "ablate":
                plan = {"cap_dir": unit, "cap_min": 0.0, "cap_max": 0.0}
            else:
                plan = {"cap_dir": unit, "cap_min": op.cap_min, "cap_max": op.cap_max}
            plan["positions"] = op.positions
            self._plans.setdefault(layer, []).append(plan)
        self._readout_dirs: dict[int, Tensor] = {}
        if readout is not None:
            for layer in readout.layers:
                layer = self.layout.check_layer(layer, allow_embeddings=False)
                self._readout_dirs[layer] = readout.directions[layer].to(device=device, dtype=torch.float32)

    def _make_hook(self, layer: int):
        plans = self._plans.get(layer, [])
        readout_dirs = self._readout_dirs.get(layer)
        tracker = self.positions

        def hook(_module: nn.Module, _args: tuple, output: object):
            hidden = output[0] if isinstance(output, tuple) else output
            batch, seq, width = hidden.shape
            # In-place edits would corrupt autograd's saved tensors during training.
            inplace = not (torch.is_grad_enabled() and hidden.requires_grad)
            flat = hidden.reshape(batch * seq, width)
            if not flat.is_contiguous():
                flat = flat.contiguous()
                inplace = False
            projections = None
            active = [p for p in plans if tracker.applies(p["positions"])]
            for i, plan in enumerate(active):
                last = i == len(active) - 1
                flat, proj = fused_steer_project(
                    flat,
                    steer_vec=plan.get("steer_vec"),
                    alpha=plan.get("alpha", 0.0),
                    cap_dir=plan.get("cap_dir"),
                    cap_min=plan.get("cap_min"),
                    cap_max=plan.get("cap_max"),
                    readout=readout_dirs if last else None,
                    inplace=inplace,
                )
                if last:
                    projections = proj
            if readout_dirs is not None:
                if projections is None:  # nothing steered here: read out only
                    projections = flat.float() @ readout_dirs.T
                self.readout.records[layer].append(projections.detach().view(batch, seq, -1))
            if inplace:
                return None
            new_hidden = flat.view(batch, seq, width)
            return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden

        return hook

    def __enter__(self) -> ResidualEditor:
        if self.readout is not None:
            self.readout.clear()
        layers = sorted(set(self._plans) | set(self._readout_dirs))
        with self._handles.registering() as handles:
            handles.add(self.layout.body.register_forward_pre_hook(self.positions.pre_hook, with_kwargs=True))
            for layer in layers:
                handles.add(self.layout.blocks[layer - 1].register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        self._handles.remove()


def _layer_list(layers: object, what: str) -> list[int] | None:
    """``layers`` as a list of ints (None stays None); a float, a string or an empty list is refused here, in
    one line, rather than deep inside hook installation."""
    if layers is None:
        return None
    items = [layers] if isinstance(layers, int | float | str | bytes) else layers
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"{what} must be an int or a list of ints, got {layers!r}") from None
    if not items:
        raise ValueError(f"{what} is empty: nothing would be steered or read out; pass at least one layer (or None "
                         "for the vectors' recommended layer)")
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{what} must be ints, got {layer!r} ({type(layer).__name__})")
    return items


def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {what} for {n} vectors")
        return list(value)
    return [value] * n


def build_ops(
    model: nn.Module,
    vectors: VectorSource | Sequence[VectorSource],
    layers: int | Sequence[int] | None = None,
    coef: float | Sequence[float] = 1.0,
    *,
    mode: Mode = "add",
    positions: Positions = "all",
    cap: tuple[float | None, float | None] | None = None,
    relative: bool = False,
    kind: str | None = None,
) -> list[SteerOp]:
    """Expand a user's steering request into one ``SteerOp`` per (vector, layer)."""
    layout = get_layout(model)
    sources = list(vectors) if isinstance(vectors, list | tuple) else [vectors]
    if not sources:
        raise ValueError("no steering vectors given")
    check_choice(mode, "steering mode", MODES)
    check_choice(positions, "positions", POSITIONS)
    coefs = [check_number(c, "steering coefficient") for c in _as_list(coef, len(sources), "coefficients")]
    layers = _layer_list(layers, "layers")
    ops = []
    for source, c in zip(sources, coefs, strict=True):
        source = load_vectors(source, model)  # objects too: vectors of another model's depth are refused
        chosen = [pick_layer(source, None)] if layers is None else layers
        for layer in chosen:
            layer = layout.check_layer(layer, allow_embeddings=False)
            vec = resolve_vector(source, layer, kind=kind, d_model=layout.d_model)
            scale = float(c)
            if relative and mode == "add":
                scale *= _typical_norm(source, layer) / float(vec.norm())
            lo, hi = cap if cap is not None else (None, None)
            ops.append(SteerOp(layer=layer, vector=vec, mode=mode, coef=scale, cap_min=lo, cap_max=hi,
                               positions=positions))
    return ops


def _typical_norm(source: VectorSource, layer: int) -> float:
    if isinstance(source, TraitVectors) and source.layer_norm(layer) is not None:
        return float(source.layer_norm(layer))
    raise ValueError(
        "relative coefficients need the typical residual norm at this layer: use TraitVectors extracted by "
        "steerlib (they record it) or pass raw coefficients"
    )


def build_readout(
    model: nn.Module,
    traits: Mapping[str, VectorSource] | TraitVectors,
    layers: int | Sequence[int] | None = None,
    kind: str | None = None,
) -> TraitReadout:
    """A read-out of the projection of every token on each trait's unit direction at ``layers``."""
    layout = get_layout(model)
    if isinstance(traits, TraitVectors):
        traits = {traits.trait: traits}
    if not traits:
        raise ValueError("no trait vectors to read out")
    if len(traits) > 16:
        raise ValueError(f"at most 16 traits can be read out at once, got {len(traits)}")
    loaded = {name: load_vectors(src) for name, src in traits.items()}
    layers = _layer_list(layers, "read-out layers")
    if layers is None:
        recs = {pick_layer(tv, None) if isinstance(tv, TraitVectors) else None for tv in loaded.values()}
        if len(recs) != 1 or None in recs:
            raise ValueError("pass read-out layers explicitly (the vectors do not share one recommended layer)")
        layers = [recs.pop()]
    layers = [layout.check_layer(x, allow_embeddings=False) for x in layers]
    directions = {
        layer: _unit_rows([resolve_vector(src, layer, kind=kind, d_model=layout.d_model) for src in loaded.values()])
        for layer in layers
    }
    return TraitReadout(names=list(loaded), layers=layers, directions=directions)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: VectorSource | Sequence[VectorSource],
    layers: int | Sequence[int] | None = None,
    coef: float | Sequence[float] = 1.0,
    *,
    mode: Mode = "add",
    positions: Positions = "all",
    cap: tuple[float | None, float | None] | None = None,
    relative: bool = False,
    kind: str | None = None,
    readout: TraitReadout | None = None,
    threads: Literal["owner", "any"] = "owner",
) -> Iterator[ResidualEditor]:
    """Steer every forward pass inside the ``with`` block.

    Hooks are global state on the model: while the block is open, a forward pass of this model from any thread
    would be steered. So by default only the thread that entered the block may run the model; a forward pass
    from another thread raises ``ForeignThreadForward`` instead of silently returning steered text. To serve
    steered and unsteered requests at once, use per-request steering: ``steerlib serve`` (each request's
    ``steering`` field, batched rows steered independently) or one model copy per thread.

    Args:
        model: HF causal LM.
        vectors: a TraitVectors, a [d_model] or [n_layers + 1, d_model] tensor, a saved vectors path, or a list
            of these (each is applied at every layer in ``layers``).
        layers: residual layers 1..n_layers to edit (default: the vectors' recommended layer).
        coef: scale of the added vector (one per vector, or one for all). With ``relative=True`` it is a
            fraction of the typical residual norm at that layer: the added vector has norm
            ``coef * typical_norm`` whatever the norm of ``v``.
        mode: "add", "ablate" or "cap".
        positions: "all", "prompt" (prefill only) or "response" (generated tokens only).
        cap: (min, max) projection bounds for ``mode="cap"``.
        relative: interpret ``coef`` relative to the typical residual norm (see above).
        kind: pooling kind of TraitVectors to use (default response_mean).
        readout: a ``TraitReadout`` (see ``build_readout``) to fill with per-token projections.
        threads: "owner" (default): forward passes from other threads raise; "any": they run, steered (e.g. a
            ``TextIteratorStreamer`` pattern where ``generate`` runs in a thread you start inside the block).

    Example:
        >>> with steer(model, vectors, layers=16, coef=4.0):
        ...     out = model.generate(**inputs, max_new_tokens=40)
    """
    check_choice(threads, "threads", ("owner", "any"))
    ops = build_ops(model, vectors, layers, coef, mode=mode, positions=positions, cap=cap, relative=relative,
                    kind=kind)
    guard = owner_thread_only(model) if threads == "owner" else contextlib.nullcontext()
    with guard, ResidualEditor(model, ops, readout) as editor:
        yield editor


@contextlib.contextmanager
def read_out(model: nn.Module, readout: TraitReadout) -> Iterator[TraitReadout]:
    """Record per-token projections without steering."""
    with ResidualEditor(model, (), readout):
        yield readout


# Names of the first release, kept importable: the read-out was called a monitor.
Monitor = TraitReadout
build_monitor = build_readout
monitoring = read_out
