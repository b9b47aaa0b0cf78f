"""The steering a vLLM request carries: a JSON string in ``SamplingParams.extra_args["steerlib"]``.

vLLM's ``vllm_xargs`` take only str/int/float/list values, so a request's steering travels as one JSON string.
A client may write it with vectors (inline floats or names)::

    {"edits": [{"layer": 16, "vector": [..d_model floats..] or "name", "mode": "add", "coef": 4.0,
                "positions": "all", "cap_min": null, "cap_max": null, "params": {}, "relative": false,
                "when": {"vector": [..] or "name", "above": 0.5, "below": null, "latch": false}}],
     "readout": true}

or as edits already lowered (``encode_rows``): ``{"layer", "row", "coef", "lo", "hi", "positions"}`` plus, for a
gated edit, ``{"gate_row", "gate_lo", "gate_hi", "latch"}`` (null bounds = unbounded), where ``row`` and
``gate_row`` are either the table row as floats or its **content key** (``steerlib.vllm.slots``). The API process
(the plugin's ``process_inputs``) registers every row in the engine's vector store and rewrites the spec to keys
(``register_spec``), so workers receive keys only and read each row once into their slot table.

A ``vector`` given by name is looked up in the folder named by ``$STEERLIB_VLLM_VECTORS`` (one saved
TraitVectors per entry, its file or folder stem being the name). The same parse runs on both sides, so a spec the
API process accepted cannot fail in a worker. ``cache_salt(spec)`` names the steering for vLLM's prefix cache: KV
blocks computed under one steering are never reused by a request with another (or none).

``mode`` is any registered steering method, with its own parameters in ``params`` (``coef``, ``cap_min`` and
``cap_max`` are the generic shorthands, as for ``SteerOp``); ``relative`` scales the method's strength.
``positions`` is a rule as ``steerlib.steering.plan.position_rule`` reads it (any registered rule). Conditions
(``when``, gates evaluated in the op at the edit's layer, latched per request) travel as the plan lowers them.
What vLLM cannot apply is declared once, ``SUPPORT``, and refused by the plan's ``check_supported``:
``marker:TEXT`` positions are not carried yet (they need the generated text watched between steps).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from steerlib.core.loading import load_vectors, resolve_vector
from steerlib.core.vectors import TraitVectors
from steerlib.steering.plan import (
    Condition,
    Edit,
    PositionRule,
    SteeringNotSupported,
    SteerOp,
    Support,
    check_supported,
    lower_op,
    method_named,
    position_rule,
)
from steerlib.vllm.slots import VectorStore, content_key, is_key

__all__ = ["SPEC_KEY", "VECTORS_ENV", "ParsedSpec", "RowSource", "UnsupportedOnVllm", "cache_salt", "encode_rows",
           "encode_spec", "parse_spec", "register_spec", "spec_keys"]

SPEC_KEY = "steerlib"
VECTORS_ENV = "STEERLIB_VLLM_VECTORS"
_EDIT_KEYS = {"layer", "vector", "mode", "coef", "positions", "cap_min", "cap_max", "params", "relative", "when"}
_WHEN_KEYS = {"vector", "above", "below", "latch"}
_LOWERED_KEYS = {"layer", "row", "coef", "lo", "hi", "positions", "gate_row", "gate_lo", "gate_hi", "latch"}
_UNIT_TOL = 1e-4

# Rows of keyed edits by key (a worker's slot table, or the store in the API process); raises KeyError on an
# unknown key.
RowSource = Callable[[list[str]], Mapping[str, Tensor]]


class UnsupportedOnVllm(SteeringNotSupported):
    """Steering the vLLM backend cannot apply yet (see ``SUPPORT``)."""


# What the worker's fixed plan applies: gates and latches, no marker positions (nothing watches the text).
SUPPORT = Support("the vLLM engine", markers=False)


def _rule(positions: object, where: str) -> PositionRule:
    """The position rule of an edit (one line naming the edit when it is not one)."""
    try:
        return position_rule(positions)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check(edits: Sequence[Edit]) -> None:
    """Refuse what vLLM cannot apply, with the plan's one message."""
    try:
        check_supported(edits, SUPPORT)
    except SteeringNotSupported as exc:
        raise UnsupportedOnVllm(str(exc)) from None


class ParsedSpec:
    """A request's steering after parsing: its lowered edits and whether it wants the trait read-out."""

    def __init__(self, edits: list[Edit], readout: bool):
        self.edits = edits
        self.readout = readout

    @property
    def keys(self) -> list[str]:
        """Every content key the edits use (rows and gate directions), in order, once each."""
        keys = [k for e in self.edits for k in (e.key, e.gate_key) if k is not None]
        return list(dict.fromkeys(keys))


def _floats(t: Tensor) -> list[float]:
    return [float(x) for x in t.detach().float().cpu().tolist()]


def _bound(x: float) -> float | None:
    return None if math.isinf(x) else float(x)


def encode_spec(ops: Sequence[SteerOp], readout: bool = False) -> str:
    """The JSON string for validated ``SteerOp``s (vectors inline, absolute coefficients).

    Raises:
        UnsupportedOnVllm: an op needs what vLLM cannot apply (``SUPPORT``: a marker position).
    """
    _check([lower_op(op) for op in ops])
    edits = []
    for op in ops:
        item = {"layer": op.layer, "vector": _floats(op.vector), "mode": op.mode, "params": op.method_params(),
                "positions": op.rule.spec()}
        if op.when is not None:
            item["when"] = {"vector": _floats(op.when.vector), "above": op.when.above, "below": op.when.below,
                            "latch": op.when.latch}
        edits.append(item)
    return json.dumps({"edits": edits, "readout": bool(readout)}, separators=(",", ":"))


def encode_rows(edits: Sequence[Edit], readout: bool = False, store: VectorStore | None = None) -> str:
    """The JSON string for edits a server already lowered (the plan's ``Edit``s: table row and scalars as
    they are, so the worker applies exactly what the server's engine would).

    With ``store`` the rows are written there once and the spec carries their content keys (a few hundred bytes
    whatever the width); without, the rows travel inline as floats.

    Raises:
        UnsupportedOnVllm: an edit needs what vLLM cannot apply (``SUPPORT``: a marker position).
    """
    def row(t: Tensor) -> str | list[float]:
        # The key is the row's own digest (put computes it), whatever key an edit was built with.
        return _floats(t) if store is None else store.put(t)

    _check(edits)
    items = []
    for e in edits:
        item = {"layer": int(e.layer), "row": row(e.row), "coef": float(e.coef), "lo": _bound(e.lo),
                "hi": _bound(e.hi), "positions": e.rule.spec()}
        if e.gate_row is not None:
            item.update(gate_row=row(e.gate_row), gate_lo=_bound(e.gate_lo), gate_hi=_bound(e.gate_hi),
                        latch=bool(e.latch))
        items.append(item)
    return json.dumps({"edits": items, "readout": bool(readout)}, separators=(",", ":"))


def cache_salt(spec: str | None) -> str | None:
    """A prefix-cache salt for a steering spec (None when it edits nothing: unsteered KV is shared)."""
    if not spec:
        return None
    data = json.loads(spec)
    if not data.get("edits"):
        return None
    edits = json.dumps(data["edits"], sort_keys=True, separators=(",", ":"))
    return "steerlib-" + hashlib.sha256(edits.encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=1)
def _named_vectors(folder: str) -> dict[str, TraitVectors]:
    out: dict[str, TraitVectors] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        tv = load_vectors(path)
        if isinstance(tv, TraitVectors):
            out[path.stem] = tv
    return out


def _vector(where: str, raw: object, layer: int, n_layers: int, d_model: int) -> tuple[Tensor, TraitVectors | None]:
    if isinstance(raw, str):
        folder = os.environ.get(VECTORS_ENV)
        if not folder:
            raise ValueError(f"{where}: vector {raw!r} is a name but ${VECTORS_ENV} names no folder")
        named = _named_vectors(folder)
        if raw not in named:
            raise ValueError(f"{where}: unknown vector {raw!r}; available: {sorted(named)}")
        tv = named[raw]
        if tv.n_positions != n_layers + 1:
            raise ValueError(f"{where}: vector {raw!r} has {tv.n_positions - 1} layers, the model {n_layers}")
        return resolve_vector(tv, layer, d_model=d_model), tv
    if not isinstance(raw, list) or len(raw) != d_model or not all(isinstance(x, int | float) for x in raw):
        raise ValueError(f"{where}: 'vector' must be a name or a list of {d_model} numbers")
    return torch.tensor(raw, dtype=torch.float32), None


def _number(where: str, name: str, value: object, default: float) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{where}: {name} must be a number")
    return float(value)


def _row(where: str, name: str, raw: object, d_model: int, rows: Mapping[str, Tensor]) -> tuple[Tensor, str]:
    """A lowered row given as floats or as a content key: ``(row [D] fp32, key)``."""
    if isinstance(raw, str):
        vec = rows.get(raw)
        if vec is None:
            raise ValueError(f"{where}: '{name}' {raw!r} is not a registered vector key")
        if vec.shape != (d_model,):
            raise ValueError(f"{where}: '{name}' {raw!r} has width {vec.shape[-1]}, the model {d_model}")
        return vec, raw
    if not isinstance(raw, list) or len(raw) != d_model or not all(isinstance(x, int | float) for x in raw):
        raise ValueError(f"{where}: '{name}' must be a vector key or a list of {d_model} numbers")
    vec = torch.tensor(raw, dtype=torch.float32)
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{where}: '{name}' has NaN or inf values")
    return vec, content_key(vec)


def _lowered_edit(i: int, item: dict, n_layers: int, d_model: int, rows: Mapping[str, Tensor]) -> Edit:
    where = f"steerlib edit {i}"
    unknown = set(item) - _LOWERED_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    layer = item.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers:
        raise ValueError(f"{where}: layer must be an int in 1..{n_layers}, got {layer!r}")
    vec, key = _row(where, "row", item.get("row"), d_model, rows)
    coef = _number(where, "coef", item.get("coef"), 0.0)
    if not math.isfinite(coef):
        raise ValueError(f"{where}: coef must be a number")
    lo = _number(where, "lo", item.get("lo"), -math.inf)
    hi = _number(where, "hi", item.get("hi"), math.inf)
    rule = _rule(item.get("positions", "all"), where)
    if lo > hi:
        raise ValueError(f"{where}: lo ({lo}) must be <= hi ({hi})")
    if (math.isfinite(lo) or math.isfinite(hi)) and abs(float(vec.norm()) - 1.0) > _UNIT_TOL:
        raise ValueError(f"{where}: a bounded edit needs a unit row (norm {float(vec.norm()):.4g})")
    if item.get("gate_row") is None:
        if any(item.get(k) is not None for k in ("gate_lo", "gate_hi", "latch")):
            raise ValueError(f"{where}: gate_lo, gate_hi and latch need a gate_row")
        return Edit(layer, key, vec, coef, lo, hi, rule)
    gate, gate_key = _row(where, "gate_row", item["gate_row"], d_model, rows)
    if abs(float(gate.norm()) - 1.0) > _UNIT_TOL:
        raise ValueError(f"{where}: a gate needs a unit row (norm {float(gate.norm()):.4g})")
    glo = _number(where, "gate_lo", item.get("gate_lo"), -math.inf)
    ghi = _number(where, "gate_hi", item.get("gate_hi"), math.inf)
    if glo > ghi:
        raise ValueError(f"{where}: gate_lo ({glo}) must be <= gate_hi ({ghi})")
    if math.isinf(glo) and math.isinf(ghi):
        raise ValueError(f"{where}: a gate needs gate_lo and/or gate_hi")
    latch = item.get("latch", False)
    if not isinstance(latch, bool):
        raise ValueError(f"{where}: latch must be true or false")
    return Edit(layer, key, vec, coef, lo, hi, rule, gate_key, gate, glo, ghi, latch)


def _condition(where: str, raw: object, layer: int, n_layers: int, d_model: int) -> Condition:
    if not isinstance(raw, dict) or "vector" not in raw or set(raw) - _WHEN_KEYS:
        raise ValueError(f"{where}: 'when' must be an object with 'vector' and 'above'/'below' (and 'latch')")
    vec, _ = _vector(f"{where} when", raw["vector"], layer, n_layers, d_model)
    try:
        return Condition(vec, above=raw.get("above"), below=raw.get("below"), latch=raw.get("latch", False))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _keys_of(items: list) -> list[str]:
    """The content keys a spec's lowered items name (before any row is read)."""
    out = []
    for item in items:
        if isinstance(item, dict) and "row" in item:
            out += [item[k] for k in ("row", "gate_row") if isinstance(item.get(k), str)]
    return list(dict.fromkeys(out))


def spec_keys(spec: str) -> list[str]:
    """The content keys a (registered) spec names, without reading any row."""
    data = json.loads(spec)
    return _keys_of(data.get("edits", []) if isinstance(data, dict) else [])


def parse_spec(spec: str, n_layers: int, d_model: int, rows: RowSource | None = None) -> ParsedSpec:
    """Parse and check a steering spec for a model of ``n_layers`` blocks and width ``d_model``.

    Args:
        rows: where the rows of keyed edits come from (all keys of the spec at once); None: keys are refused.

    Raises:
        ValueError: one line naming the first problem.
    """
    try:
        data = json.loads(spec)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"steerlib: the steering spec is not JSON ({exc})") from None
    if not isinstance(data, dict) or set(data) - {"edits", "readout"}:
        raise ValueError("steerlib: the steering spec must be an object with 'edits' and optionally 'readout'")
    items = data.get("edits", [])
    if not isinstance(items, list):
        raise ValueError("steerlib: 'edits' must be a list")
    keys = _keys_of(items)
    resolved: Mapping[str, Tensor] = {}
    if keys:
        bad = next((k for k in keys if not is_key(k)), None)
        if bad is not None:
            raise ValueError(f"steerlib: {bad!r} is not a vector key (24 hex digits)")
        if rows is None:
            raise ValueError("steerlib: the spec names vectors by key but no vector store is configured")
        try:
            resolved = rows(keys)
        except KeyError as exc:
            raise ValueError(str(exc.args[0]) if exc.args else "steerlib: unknown vector key") from None
    edits = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and "row" in item:
            edits.append(_lowered_edit(i, item, n_layers, d_model, resolved))
            continue
        where = f"steerlib edit {i}"
        if not isinstance(item, dict) or "layer" not in item or "vector" not in item:
            raise ValueError(f"{where}: needs at least 'layer' and 'vector'")
        unknown = set(item) - _EDIT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        layer = item["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers:
            raise ValueError(f"{where}: layer must be an int in 1..{n_layers}, got {layer!r}")
        mode = item.get("mode", "add")
        try:
            method = method_named(mode)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        positions = _rule(item.get("positions", "all"), where)
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{where}: 'params' must be an object of the method's parameters")
        vec, tv = _vector(where, item["vector"], layer, n_layers, d_model)
        coef = item.get("coef", 1.0)
        if not isinstance(coef, int | float) or not math.isfinite(coef):
            raise ValueError(f"{where}: coef must be a finite number")
        coef = float(coef)
        when = _condition(where, item["when"], layer, n_layers, d_model) if item.get("when") is not None else None
        try:
            op = SteerOp(layer=layer, vector=vec, mode=mode, coef=coef, cap_min=item.get("cap_min"),
                         cap_max=item.get("cap_max"), positions=positions, when=when, params=params)
            if item.get("relative"):
                norm = tv.layer_norm(layer) if tv is not None else None
                if method.strength is None or norm is None:
                    raise ValueError(f"relative needs a method with a strength (mode {mode!r} has none) and a "
                                     "named vector with recorded residual norms")
                op = op.with_strength(float(getattr(op.method, method.strength)) * float(norm) / float(vec.norm()))
            edits.append(lower_op(op))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    _check(edits)
    readout = data.get("readout", False)
    if not isinstance(readout, bool):
        raise ValueError("steerlib: 'readout' must be true or false")
    return ParsedSpec(edits, readout)


def register_spec(spec: str, n_layers: int, d_model: int, store: VectorStore) -> tuple[str, ParsedSpec]:
    """Check a client's spec (floats, names or keys) and rewrite it with content keys, writing new rows to
    ``store`` once (the API process's side of registration): ``(keyed spec, parsed spec)``.

    Raises:
        ValueError: one line naming the first problem (as ``parse_spec``).
    """
    parsed = parse_spec(spec, n_layers, d_model, rows=lambda keys: {k: store.get(k) for k in keys})
    return encode_rows(parsed.edits, parsed.readout, store=store), parsed
