"""Steering the residual stream during any forward pass, with per-token trait read-out.

``steer(model, vectors, layers, coef)`` (or ``steer(model, ops)``) is a context manager: inside it every forward
pass (``model(...)``, ``model.generate``, a training step) is edited by a registered method at the chosen layers
(add ``coef * v``, ablate ``v``, cap the projection on ``v``, or one of ``register_method``). The edit and the
trait read-out happen in the one per-row op (``steerlib.kernels``: Triton/CUDA on GPU, torch on CPU), through
the steering plan and the one residual hook point (``steerlib.core.hooks.hook_residual``).

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
from transformers import StoppingCriteria

from steerlib.core.arch import Layout, get_layout
from steerlib.core.checks import check_choice, check_number
from steerlib.core.compat import find_cache, past_length
from steerlib.core.hooks import HookHandles, hook_residual
from steerlib.core.loading import load_vectors, pick_layer, resolve_vector
from steerlib.core.renamed import renamed_getattr
from steerlib.core.vectors import TraitVectors, VectorSource, check_vector
from steerlib.steering.plan import (
    Condition,
    FromMarker,
    SteeringPlan,
    SteerOp,
    Support,
    check_supported,
    lower_ops,
    method_named,
    position_rule,
)
from steerlib.steering.thread_guard import owner_thread_only

__all__ = ["Condition", "ResidualEditor", "SteerOp", "TraitReadout", "When", "build_ops", "build_readout", "read_out",
           "steer"]

# A registered method's name ("add", "ablate", "cap" or one of ``register_method``) and a position rule's text
# ("all", "prompt", "response", "first:N"... or one of ``register_positions``): the registries decide, not a list.
Mode = str
Positions = str


class _PositionTracker:
    """Knows, for the current forward pass, the absolute positions of its tokens and the prompt's length.

    A forward pre-hook on the decoder body reads how many tokens the KV cache already holds before any block
    runs (the cache is found by type, not by keyword: see ``steerlib.core.compat``). An empty cache means a
    prefill, whose tokens are the prompt (so the prompt length is that pass's length); later passes continue
    from the cache. Positions are in the batch's padded coordinates, which is all the plan's rule needs
    ("prompt iff position < prompt length"). When the split cannot be established (no cache found but the
    position ids run past the pass), ``known`` is False and edits restricted to prompt or response raise.
    """

    def __init__(self) -> None:
        self.past_len = 0
        self.prompt_len = 0
        self.seq_len = 0
        self.batch = 0
        self.known = True
        self.new_prompt = False

    def pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.batch = int(x.shape[0]) if isinstance(x, Tensor) else 0
        self.seq_len = int(x.shape[1]) if isinstance(x, Tensor) else 0
        past = past_length(args, kwargs)
        self.known = past is not None
        if past == 0 and find_cache(args, kwargs) is None:
            # No cache object was found. If the position ids run past this pass's length, tokens came
            # before it: the cache is being passed in a way this version of steerlib does not recognise.
            position_ids = kwargs.get("position_ids")
            if isinstance(position_ids, Tensor) and position_ids.numel() and int(position_ids.max()) >= self.seq_len:
                self.known = False
        self.past_len = past if self.known and past is not None else 0
        if self.known and past == 0:
            self.prompt_len = self.seq_len
            self.new_prompt = True

    def in_prompt(self) -> bool:
        """Whether the current pass starts inside the prompt (the prefill); raises if that cannot be told."""
        self.check(True)
        return self.past_len < self.prompt_len

    def applies(self, positions: str) -> bool:
        """Whether an edit restricted to ``positions`` touches the first token of the current pass."""
        rule = position_rule(positions)
        self.check(rule.name != "all")
        start, end = rule.interval(self.prompt_len)
        return start <= self.past_len < end

    def check(self, needs_split: bool) -> None:
        """Raise if an edit restricted to prompt or response tokens meets a pass that cannot be placed."""
        if needs_split and not self.known:
            raise RuntimeError(
                "cannot tell prompt from response tokens in this forward pass: no KV cache was found among "
                "the decoder's inputs (generation with use_cache=False, or an unrecognised transformers "
                "interface); use positions='all' or generate with a KV cache"
            )


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

    # Everything the plan lowers: markers (watched by ``marker_watcher``), gates and latches.
    SUPPORT = Support("the eager editor")

    def __init__(self, model: nn.Module, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None):
        self.model = model
        self.layout: Layout = get_layout(model)
        self.ops = list(ops)
        self.readout = readout
        self.positions = _PositionTracker()
        self._handles = HookHandles()
        ops_given = [op for op in self.ops if not isinstance(op, SteerOp)]
        if ops_given:
            raise ValueError(f"ops must be SteerOps, got {type(ops_given[0]).__name__}")
        device = next(model.parameters()).device
        for op in self.ops:
            layer = self.layout.check_layer(op.layer, allow_embeddings=False)
            check_vector(op.vector, self.layout.d_model, name=f"steering vector at layer {layer}")
        # Every batch row makes the same edits: the plan has one row, and every token maps to it, unless some
        # state is per row (a latching gate, a marker position): then the plan has one row per batch row.
        self._edits = lower_ops(self.ops)
        check_supported(self._edits, self.SUPPORT)
        self._needs_split = any(e.rule.name != "all" for e in self._edits)
        self.markers = sorted({e.rule.text for e in self._edits if isinstance(e.rule, FromMarker)})
        self._per_row = bool(self.markers) or any(e.latch for e in self._edits)
        self._marker_pos: list[int | None] = [None]
        self.plan = SteeringPlan(self.layout.d_model, device)
        self.plan.set_rows([self._edits], [0])
        self._readout_dirs: dict[int, Tensor] = {}
        if readout is not None:
            for layer in readout.layers:
                layer = self.layout.check_layer(layer, allow_embeddings=False)
                self._readout_dirs[layer] = readout.directions[layer].to(device=device, dtype=torch.float32)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the blocks run: place this pass's tokens and fill the plan's per-token arguments."""
        tracker = self.positions
        tracker.pre_hook(module, args, kwargs)
        if not self.plan.layers:
            return
        tracker.check(self._needs_split)
        b, t = tracker.batch, tracker.seq_len
        if tracker.new_prompt:
            tracker.new_prompt = False
            n_rows = b if self._per_row else 1
            self._marker_pos = [None] * n_rows
            self.plan.set_rows([self._edits] * n_rows, [tracker.prompt_len] * n_rows, self._marker_pos)
        device = self.plan.device
        position = torch.arange(tracker.past_len, tracker.past_len + t, device=device).repeat(b)
        if self._per_row:
            row_of_token = torch.arange(b, device=device).repeat_interleave(t)
        else:
            row_of_token = torch.zeros(b * t, dtype=torch.int64, device=device)
        self.plan.fill(row_of_token, position)

    def set_marker(self, row: int, position: int) -> None:
        """Edits whose positions start at a marker (``FromMarker``) apply to batch row ``row`` from absolute
        position ``position`` on (the host calls this when the marker's text has been generated). Latched
        gates stay latched."""
        if not self.markers:
            raise ValueError("no edit of this editor starts at a marker")
        if self._marker_pos[row] is not None:
            return  # the first occurrence counts
        self._marker_pos[row] = int(position)
        n_rows = len(self._marker_pos)
        self.plan.set_rows([self._edits] * n_rows, [self.positions.prompt_len] * n_rows, self._marker_pos,
                           latched=self.plan.latched_edits())

    def marker_watcher(self, tokenizer, prompt_width: int) -> StoppingCriteria | None:
        """A ``StoppingCriteria`` for ``model.generate`` that never stops but, after each step, finds rows whose
        generated text now holds a marker and sets its position (the next token's); None without markers.

        Args:
            tokenizer: decodes the generated tokens.
            prompt_width: the padded prompt length (generated tokens start there).
        """
        if not self.markers:
            return None
        return _MarkerWatcher(self, tokenizer, prompt_width)

    def _make_hook(self, layer: int):
        readout_dirs = self._readout_dirs.get(layer)
        plan = self.plan

        def edit(flat: Tensor, shape: tuple[int, int], _kwargs: dict) -> Tensor | None:
            # In-place edits would corrupt autograd's saved tensors during training.
            functional = torch.is_grad_enabled() and flat.requires_grad
            if functional:
                flat, projections = plan.apply_functional(layer, flat, readout_dirs)
            else:
                projections = plan.apply(layer, flat, readout_dirs)
            if readout_dirs is not None:
                # The plan reuses its read-out buffer on the next pass: keep a copy.
                self.readout.records[layer].append(projections.detach().view(*shape, -1).clone())
            return flat if functional else None

        return edit

    def __enter__(self) -> ResidualEditor:
        if self.readout is not None:
            self.readout.clear()
        layers = sorted(set(self.plan.layers) | set(self._readout_dirs))
        with self._handles.registering() as handles:
            handles.add(self.layout.body.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for layer in layers:
                handles.add(hook_residual(self.layout, layer, self._make_hook(layer)))
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


class _MarkerWatcher(StoppingCriteria):
    """Sets an editor's marker positions from the generated text; never asks generation to stop."""

    def __init__(self, editor: ResidualEditor, tokenizer, prompt_width: int):
        self.editor = editor
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        for row in range(input_ids.shape[0]):
            if self.editor._marker_pos[row] is not None:
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_width:], skip_special_tokens=False)
            if any(m in text for m in self.editor.markers):
                # The token just generated completed the marker: the next one, at this length, is the first
                # token after it.
                self.editor.set_marker(row, int(input_ids.shape[1]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class When:
    """A condition on a trait, for ``build_ops(..., when=...)``, ``steer(..., when=...)`` and the server.

    The rule for layers: **a condition is evaluated at the layer of the edit it gates**, on the hidden state
    entering that edit, using the condition trait's vector at that layer; ``layer``, when given, must be that
    layer (a spec steering several layers with one ``layer`` here is refused rather than silently re-read).

    Attributes:
        vectors: the condition trait's vectors (anything ``load_vectors`` accepts).
        above: open where the projection on the unit direction is >= this, or None.
        below: open where it is <= this, or None.
        latch: once open at a token of a row, stay open for the rest of that row's generation.
        layer: the layer the thresholds were chosen for (checked against the edit's layer), or None.
        kind: pooling kind of TraitVectors.
    """

    vectors: VectorSource
    above: float | None = None
    below: float | None = None
    latch: bool = False
    layer: int | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.above is None and self.below is None:
            raise ValueError("a condition needs a threshold: above and/or below")

    def at(self, model: nn.Module, layer: int) -> Condition:
        """The condition for an edit at ``layer``."""
        if self.layer is not None and self.layer != layer:
            raise ValueError(f"the condition is for layer {self.layer} but the edit is at layer {layer}: a "
                             "condition is evaluated at the layer of the edit it gates")
        layout = get_layout(model)
        vec = resolve_vector(load_vectors(self.vectors, model), layer, kind=self.kind, d_model=layout.d_model)
        return Condition(vec, self.above, self.below, self.latch)


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
    when: When | None = None,
    params: Mapping[str, object] | None = None,
) -> list[SteerOp]:
    """Expand a user's steering request into one ``SteerOp`` per (vector, layer).

    ``coef`` is the method's strength (``add``'s scale); with ``relative=True`` it is a fraction of the typical
    residual norm at the layer, for any method that has a strength. ``params`` are the method's own parameters
    by name (``SteeringMethod.parameters()``). ``when`` gates every op on a condition, evaluated at each op's
    own layer (see ``When``).
    """
    layout = get_layout(model)
    if when is not None and not isinstance(when, When):
        raise ValueError(f"when must be a When, got {type(when).__name__}")
    sources = list(vectors) if isinstance(vectors, list | tuple) else [vectors]
    if not sources:
        raise ValueError("no steering vectors given")
    method = method_named(mode)
    position_rule(positions)
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
            if relative and method.strength is not None:
                scale *= _typical_norm(source, layer) / float(vec.norm())
            lo, hi = cap if cap is not None else (None, None)
            ops.append(SteerOp(layer=layer, vector=vec, mode=mode, coef=scale, cap_min=lo, cap_max=hi,
                               positions=positions, when=when.at(model, layer) if when is not None else None,
                               params=params or {}))
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


def as_ops(value: object) -> list[SteerOp] | None:
    """``value`` as a list of ops when it is a ``SteerOp`` or a non-empty sequence of them (``compose``,
    ``calibrated_cap``, ``build_ops`` give those); None when it is vectors."""
    if isinstance(value, SteerOp):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(x, SteerOp) for x in value):
        return list(value)
    if isinstance(value, list | tuple) and any(isinstance(x, SteerOp) for x in value):
        raise ValueError("a list mixing SteerOps and vectors: pass ops alone, or vectors alone")
    return None


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: VectorSource | Sequence[VectorSource] | SteerOp | Sequence[SteerOp],
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
    when: When | None = None,
    params: Mapping[str, object] | None = None,
) -> Iterator[ResidualEditor]:
    """Steer every forward pass inside the ``with`` block.

    Hooks are global state on the model: while the block is open, a forward pass of this model from any thread
    would be steered. So by default only the thread that entered the block may run the model; a forward pass
    from another thread raises ``ForeignThreadForward`` instead of silently returning steered text. To serve
    steered and unsteered requests at once, use per-request steering: ``steerlib serve`` (each request's
    ``steering`` field, batched rows steered independently) or one model copy per thread.

    Args:
        model: HF causal LM.
        vectors: ops already built (a ``SteerOp`` or a list of them: ``compose``, ``calibrated_cap``,
            ``build_ops``), applied as they are; or a TraitVectors, a [d_model] or [n_layers + 1, d_model] tensor,
            a saved vectors path, or a list of these (each is applied at every layer in ``layers``).
        layers: residual layers 1..n_layers to edit (default: the vectors' recommended layer).
        coef: scale of the added vector (one per vector, or one for all). With ``relative=True`` it is a
            fraction of the typical residual norm at that layer: the added vector has norm
            ``coef * typical_norm`` whatever the norm of ``v``.
        mode: a registered steering method: "add", "ablate", "cap" or one of ``register_method``.
        positions: a position rule's text: "all", "prompt" (prefill only), "response" (generated tokens only),
            "first:N", "window:A-B", "marker:TEXT", or one of ``register_positions``.
        cap: (min, max) projection bounds for ``mode="cap"``.
        relative: interpret ``coef`` relative to the typical residual norm (see above).
        kind: pooling kind of TraitVectors to use (default response_mean).
        readout: a ``TraitReadout`` (see ``build_readout``) to fill with per-token projections.
        threads: "owner" (default): forward passes from other threads raise; "any": they run, steered (e.g. a
            ``TextIteratorStreamer`` pattern where ``generate`` runs in a thread you start inside the block).
        when: steer only where a condition holds (``When``; evaluated at each steered layer).
        params: the method's own parameters by name (see ``SteeringMethod``).

    The arguments after ``vectors`` up to ``when`` (but ``readout`` and ``threads``) build ops from vectors; with
    ops given they are refused rather than ignored.

    Example:
        >>> with steer(model, vectors, layers=16, coef=4.0):
        ...     out = model.generate(**inputs, max_new_tokens=40)
        >>> with steer(model, compose(model, [Component(a, 4.0, [16]), Component(b, 2.0, [18])])):
        ...     out = model.generate(**inputs, max_new_tokens=40)
    """
    check_choice(threads, "threads", ("owner", "any"))
    ops = as_ops(vectors)
    if ops is None:
        ops = build_ops(model, vectors, layers, coef, mode=mode, positions=positions, cap=cap, relative=relative,
                        kind=kind, when=when, params=params)
    else:
        given = {"layers": layers is not None, "coef": coef != 1.0, "mode": mode != "add",
                 "positions": positions != "all", "cap": cap is not None, "relative": relative,
                 "kind": kind is not None, "when": when is not None, "params": bool(params)}
        extra = [k for k, v in given.items() if v]
        if extra:
            raise ValueError(f"steer() got ops and {extra[0]!r}: ops carry their own layers, coefficients, "
                             "methods and positions; pass vectors to build ops from those arguments")
    guard = owner_thread_only(model) if threads == "owner" else contextlib.nullcontext()
    with guard, ResidualEditor(model, ops, readout) as editor:
        yield editor


@contextlib.contextmanager
def read_out(model: nn.Module, readout: TraitReadout) -> Iterator[TraitReadout]:
    """Record per-token projections without steering."""
    with ResidualEditor(model, (), readout):
        yield readout


# Names of the first release (the read-out was called a monitor), served with a DeprecationWarning.
__getattr__ = renamed_getattr(__name__, {"Monitor": "TraitReadout", "build_monitor": "build_readout",
                                         "monitoring": "read_out"}, globals())
