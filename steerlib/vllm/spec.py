"""The steering a vLLM request carries: a JSON string in ``SamplingParams.extra_args["steerlib"]``.

vLLM's ``vllm_xargs`` take only str/int/float/list values, so a request's steering travels as one JSON string::

    {"edits": [{"layer": 16, "vector": [..d_model floats..] or "name", "mode": "add", "coef": 4.0,
                "positions": "all", "cap_min": null, "cap_max": null, "relative": false}],
     "readout": true}

or, for edits a server already lowered (``encode_rows``), ``{"layer", "row", "coef", "lo", "hi", "positions"}``
with the table row as is (null bounds = unbounded).

A ``vector`` given by name is looked up in the folder named by ``$STEERLIB_VLLM_VECTORS`` (one saved
TraitVectors per entry, its file or folder stem being the name), in the API process (to refuse a bad request
with a 400) and in every worker. The same parse runs on both sides, so a spec the API process accepted cannot
fail in a worker. ``cache_salt(spec)`` names the steering for vLLM's prefix cache: KV blocks computed under one
steering are never reused by a request with another (or none).

``positions`` is a rule as ``steerlib.steering.plan.position_rule`` reads it: ``all``, ``prompt``, ``response``,
``first:N`` or ``window:A-B``. Two things the HF paths do are not carried to vLLM yet and are refused, not
dropped: conditions (``when``: gates evaluated in the op and latched per request) and ``marker:TEXT`` positions
(they need the generated text watched between steps).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from steerlib.core.loading import load_vectors, resolve_vector
from steerlib.core.vectors import TraitVectors
from steerlib.steering.plan import METHODS, Edit, FromMarker, PositionRule, SteerOp, lower_op, position_rule

__all__ = ["SPEC_KEY", "VECTORS_ENV", "ParsedSpec", "UnsupportedOnVllm", "cache_salt", "encode_rows", "encode_spec",
           "parse_spec"]

SPEC_KEY = "steerlib"
VECTORS_ENV = "STEERLIB_VLLM_VECTORS"
_EDIT_KEYS = {"layer", "vector", "mode", "coef", "positions", "cap_min", "cap_max", "relative"}
_LOWERED_KEYS = {"layer", "row", "coef", "lo", "hi", "positions"}
_UNIT_TOL = 1e-4


class UnsupportedOnVllm(ValueError):
    """Steering the vLLM backend cannot apply yet (a condition, a marker position)."""


def _rule(positions: object, where: str) -> PositionRule:
    """The position rule of an edit, refusing the rules vLLM cannot apply."""
    try:
        rule = position_rule(positions)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if isinstance(rule, FromMarker):
        raise UnsupportedOnVllm(f"{where}: positions {rule.spec()!r} are not supported on the vLLM engine yet "
                                "(the marker needs the generated text watched between steps)")
    return rule


def _check_ungated(gated: bool, where: str) -> None:
    if gated:
        raise UnsupportedOnVllm(f"{where}: conditional steering ('when') is not supported on the vLLM engine yet")


class ParsedSpec:
    """A request's steering after parsing: its lowered edits and whether it wants the trait read-out."""

    def __init__(self, edits: list[Edit], readout: bool):
        self.edits = edits
        self.readout = readout


def encode_spec(ops: Sequence[SteerOp], readout: bool = False) -> str:
    """The JSON string for validated ``SteerOp``s (vectors inline, absolute coefficients).

    Raises:
        UnsupportedOnVllm: an op carries a condition or a marker position.
    """
    for i, op in enumerate(ops):
        _check_ungated(op.when is not None, f"steerlib edit {i}")
    edits = [{"layer": op.layer, "vector": [float(x) for x in op.vector.detach().float().cpu().tolist()],
              "mode": op.mode, "coef": float(op.coef), "positions": _rule(op.positions, f"steerlib edit {i}").spec(),
              "cap_min": op.cap_min, "cap_max": op.cap_max} for i, op in enumerate(ops)]
    return json.dumps({"edits": edits, "readout": bool(readout)}, separators=(",", ":"))


def encode_rows(edits: Sequence[Edit], readout: bool = False) -> str:
    """The JSON string for edits a server already lowered (the plan's ``Edit``s: table row and scalars as
    they are, so the worker applies exactly what the server's engine would).

    Raises:
        UnsupportedOnVllm: an edit carries a condition or a marker position.
    """
    for i, e in enumerate(edits):
        _check_ungated(e.gate_row is not None, f"steerlib edit {i}")
        _rule(e.rule, f"steerlib edit {i}")
    items = [{"layer": int(e.layer), "row": [float(x) for x in e.row.detach().float().cpu().tolist()],
              "coef": float(e.coef), "lo": None if math.isinf(e.lo) else float(e.lo),
              "hi": None if math.isinf(e.hi) else float(e.hi), "positions": e.rule.spec()} for e in edits]
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


def _vector(i: int, item: dict, n_layers: int, d_model: int) -> tuple[torch.Tensor, TraitVectors | None]:
    raw = item.get("vector")
    if isinstance(raw, str):
        folder = os.environ.get(VECTORS_ENV)
        if not folder:
            raise ValueError(f"steerlib edit {i}: vector {raw!r} is a name but ${VECTORS_ENV} names no folder")
        named = _named_vectors(folder)
        if raw not in named:
            raise ValueError(f"steerlib edit {i}: unknown vector {raw!r}; available: {sorted(named)}")
        tv = named[raw]
        if tv.n_positions != n_layers + 1:
            raise ValueError(f"steerlib edit {i}: vector {raw!r} has {tv.n_positions - 1} layers, the model "
                             f"{n_layers}")
        return resolve_vector(tv, item["layer"], d_model=d_model), tv
    if not isinstance(raw, list) or len(raw) != d_model or not all(isinstance(x, int | float) for x in raw):
        raise ValueError(f"steerlib edit {i}: 'vector' must be a name or a list of {d_model} numbers")
    return torch.tensor(raw, dtype=torch.float32), None


def _lowered_edit(i: int, item: dict, n_layers: int, d_model: int) -> Edit:
    unknown = set(item) - _LOWERED_KEYS
    if unknown:
        raise ValueError(f"steerlib edit {i}: unknown keys {sorted(unknown)}")
    layer, row = item.get("layer"), item.get("row")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers:
        raise ValueError(f"steerlib edit {i}: layer must be an int in 1..{n_layers}, got {layer!r}")
    if not isinstance(row, list) or len(row) != d_model or not all(isinstance(x, int | float) for x in row):
        raise ValueError(f"steerlib edit {i}: 'row' must be a list of {d_model} numbers")
    vec = torch.tensor(row, dtype=torch.float32)
    coef = item.get("coef", 0.0)
    lo = -math.inf if item.get("lo") is None else item["lo"]
    hi = math.inf if item.get("hi") is None else item["hi"]
    rule = _rule(item.get("positions", "all"), f"steerlib edit {i}")
    for name, v in (("coef", coef), ("lo", lo), ("hi", hi)):
        if not isinstance(v, int | float) or math.isnan(v) or (name == "coef" and not math.isfinite(v)):
            raise ValueError(f"steerlib edit {i}: {name} must be a number")
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"steerlib edit {i}: 'row' has NaN or inf values")
    if lo > hi:
        raise ValueError(f"steerlib edit {i}: lo ({lo}) must be <= hi ({hi})")
    if (math.isfinite(lo) or math.isfinite(hi)) and abs(float(vec.norm()) - 1.0) > _UNIT_TOL:
        raise ValueError(f"steerlib edit {i}: a bounded edit needs a unit row (norm {float(vec.norm()):.4g})")
    key = hashlib.blake2b(vec.numpy().tobytes(), digest_size=12).hexdigest()  # the plan's content key
    return Edit(layer, key, vec, float(coef), float(lo), float(hi), rule)


def parse_spec(spec: str, n_layers: int, d_model: int) -> ParsedSpec:
    """Parse and check a steering spec for a model of ``n_layers`` blocks and width ``d_model``.

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
    edits = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and "row" in item:
            edits.append(_lowered_edit(i, item, n_layers, d_model))
            continue
        if not isinstance(item, dict) or "layer" not in item or "vector" not in item:
            raise ValueError(f"steerlib edit {i}: needs at least 'layer' and 'vector'")
        unknown = set(item) - _EDIT_KEYS
        if unknown:
            raise ValueError(f"steerlib edit {i}: unknown keys {sorted(unknown)}")
        layer = item["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers:
            raise ValueError(f"steerlib edit {i}: layer must be an int in 1..{n_layers}, got {layer!r}")
        mode = item.get("mode", "add")
        if mode not in METHODS:
            raise ValueError(f"steerlib edit {i}: mode must be one of {tuple(METHODS)}")
        positions = _rule(item.get("positions", "all"), f"steerlib edit {i}")
        vec, tv = _vector(i, item, n_layers, d_model)
        coef = item.get("coef", 1.0)
        if not isinstance(coef, int | float) or not math.isfinite(coef):
            raise ValueError(f"steerlib edit {i}: coef must be a finite number")
        coef = float(coef)
        if item.get("relative"):
            norm = tv.layer_norm(layer) if tv is not None else None
            if mode != "add" or norm is None:
                raise ValueError(f"steerlib edit {i}: relative needs mode 'add' and a named vector with recorded "
                                 "residual norms")
            coef *= float(norm) / float(vec.norm())
        try:
            op = SteerOp(layer=layer, vector=vec, mode=mode, coef=coef, cap_min=item.get("cap_min"),
                         cap_max=item.get("cap_max"), positions=positions)
            edits.append(lower_op(op))
        except ValueError as exc:
            raise ValueError(f"steerlib edit {i}: {exc}") from None
    readout = data.get("readout", False)
    if not isinstance(readout, bool):
        raise ValueError("steerlib: 'readout' must be true or false")
    return ParsedSpec(edits, readout)
