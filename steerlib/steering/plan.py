"""The one steering plan: steering specs lowered to vector tables and per-token arguments of the one op.

Every steering path in steerlib (the eager editor, the compiled path, the serving engine, the vLLM plugin)
consumes this module and nothing else decides what an edit means:

* a **steering method** (``Add``, ``Ablate``, ``Cap``...) lowers itself, for a given vector, to one table row and
  three per-token scalars: ``(row [D], coef, lo, hi)``. The per-row op (``steerlib.kernels``, torch / Triton /
  CUDA) then computes ``h1 = h + coef * row``; ``p = <h1, row>``; ``h2 = h1 + (clamp(p, lo, hi) - p) * row``;
* a **position rule** (``all``, ``prompt``, ``response``...) lowers, for a row whose prompt has ``P`` tokens, to a
  half-open interval ``[start, end)`` of absolute positions. The prompt/response rule is stated once, here:
  **a token at absolute position ``p`` is a prompt token iff ``p < P``**;
* a **condition** (``Condition``, ``SteerOp.when``) gates an edit: the edit applies to a token only where the
  token's projection on a unit condition direction, measured at the edit's own layer on the hidden state entering
  the edit, lies in ``[above, below]``. The rule for layers is stated here once: **a condition is evaluated at
  the layer of the edit it gates** (its direction is the condition trait's vector at that layer), inside the
  same fused op (``steerlib.kernels.rows``). With ``latch=True``, once the gate opens at a token of a batch row,
  that edit stays open for the row's later forward passes (the plan records it on the device after each pass;
  tokens of the same pass are still decided one by one, so in a prefill the tokens before and after the first
  open one are gated per token);
* a ``SteeringPlan`` holds, per steered layer, a table ``[V, D]`` whose row 0 is zeros ("no edit"), and per
  (layer, slot, batch row) the table entry, coefficient, bounds and interval. ``fill(row_of_token, position)``
  turns that into per-token ``index / coef / lo / hi`` buffers (written in place, a handful of tensor ops
  whatever the batch, no Python loop over tokens), and ``apply(layer, hidden)`` runs the registered op once
  per slot. A *slot* is the n-th edit a row makes at a layer: two edits at one layer (an add and a cap, say)
  are two slots, applied in the order given;
* a plan is **growing** (tables and slots sized to the rows, buffers grown with the pass: the eager editor, the
  compiled path, the HF engine) or **fixed** (``PlanCapacity``: the vLLM worker). A fixed plan allocates every
  tensor once and writes only in place; each of its layers has the same slots whatever the rows ask, and
  ``apply`` launches the same op calls with every argument (gates, latches, a ``[tokens, K]`` read-out per layer)
  reading only device memory, so a CUDA graph captured with no steering replays any steering. ``write_row``
  puts a vector into table row ``i`` of a layer (with its content key, ``set_rows`` then finds it there).

Extending: methods and position rules
-------------------------------------
A method is one registered class; its dataclass fields are its parameters (names, types, defaults; checks in
``__post_init__``), ``strength`` names the parameter that ``coef`` sets, ``relative=True`` scales and a
per-row coefficient replaces, and ``features`` the per-row op's arguments it uses. Nothing else changes (no hook,
kernel, schema, CLI or engine code)::

    @register_method
    @dataclass(frozen=True)
    class Pin(SteeringMethod):
        '''Set the projection on the unit direction to exactly ``value``.'''
        name: ClassVar[str] = "pin"
        strength: ClassVar[str | None] = "value"
        features: ClassVar[frozenset[str]] = frozenset({"cap"})
        value: float = 0.0

        def lower(self, vector):
            return Lowered(unit(vector), 0.0, self.value, self.value)

``SteerOp(layer, v, mode="pin", coef=2.0)`` (or ``params={"value": 2.0}``) then steers through every path:
``steer()``, ``generate()``, the compiled path, the server (``"mode": "pin", "params": {...}``), the CLI
(``--mode pin --param value=2``) and the vLLM spec. A position rule is one registered class too: its ``name`` is
the prefix it is written with (``first:8`` is ``FirstGenerated.parse("8")``), ``parse`` reads the text after the
colon, and ``requires`` names what a consumer must support to apply it (``FromMarker``: ``"markers"``).
``tests/test_extend.py`` adds a toy method and a toy rule that way and uses them through every consumer.

What each consumer can apply is declared once, as a ``Support`` (markers, gates, latches, op features), and one
check, ``check_supported``, refuses the rest before any work with the same message everywhere.
A method must be expressible in the per-row op's arguments; one that is not needs a new op argument first.
"""

from __future__ import annotations

import hashlib
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from steerlib.core.checks import check_number
from steerlib.core.vectors import check_vector
from steerlib.kernels import fused_steer_rows, resolve_backend, steer_rows_, steer_rows_inline, steer_rows_op

INF = math.inf
# The end of an open interval, as an int64 (positions are compared as integers on the device).
NO_END = 2**62


def unit(vector: Tensor) -> Tensor:
    """``vector`` scaled to unit L2 norm (fp32)."""
    v = vector.float()
    return v / v.norm()


@dataclass(frozen=True)
class Lowered:
    """A method's edit in the per-row op's terms: table row ``[D]`` fp32, coefficient and cap bounds."""

    row: Tensor
    coef: float = 0.0
    lo: float = -INF
    hi: float = INF


# The per-row op's arguments a method may use: "add" (coef * row) and "cap" (the clamp of the projection).
OP_FEATURES = frozenset({"add", "cap"})
# Parameter values a method may declare (what JSON, the CLI and Python all carry).
_PARAM_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One declared parameter of a steering method (read from the method's dataclass fields)."""

    name: str
    type: type  # bool, int, float or str
    optional: bool  # None is allowed (e.g. an unbounded side of a cap)
    default: Any = MISSING  # MISSING: required

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def check(self, value: object, method: str) -> object:
        """``value`` checked against the declared type (an int is a valid float); one-line error otherwise."""
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"method {method!r} parameter {self.name!r} must be {self.type.__name__}"
                             f"{' or null' if self.optional else ''}, got {value!r}")
        if self.type is float:
            check_number(value, f"method {method!r} parameter {self.name!r}")
        return value


class SteeringMethod(ABC):
    """A way of editing the residual stream along a vector; it lowers itself to the per-row op's arguments.

    Subclasses are frozen dataclasses: their fields are the method's parameters (bool, int, float or str,
    ``X | None`` for an optional one). Class attributes:

    * ``name``: what ``SteerOp(mode=...)``, HTTP ``"mode"`` and ``--mode`` call it;
    * ``strength``: the parameter that the generic ``coef`` sets, ``relative=True`` scales by the typical residual
      norm over the vector's norm, and a per-row coefficient replaces (None: the method has no strength; a
      per-row coefficient then switches it on (1) or off (0));
    * ``features``: which of the per-row op's arguments it uses (``OP_FEATURES``), so a consumer that lacks one
      refuses it.
    """

    name: ClassVar[str]
    strength: ClassVar[str | None] = None
    features: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def parameters(cls) -> dict[str, Param]:
        """The method's declared parameters, by name, in declaration order."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):  # type: ignore[arg-type]
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            kinds = [a for a in args if a is not type(None)]
            if len(kinds) != 1 or kinds[0] not in _PARAM_TYPES:
                raise TypeError(f"method {cls.name!r} parameter {f.name!r} must be bool, int, float or str "
                                f"(optionally | None), got {hints[f.name]!r}")
            default = f.default if f.default is not MISSING else MISSING
            out[f.name] = Param(f.name, kinds[0], type(None) in args, default)
        return out

    @classmethod
    def from_params(cls, values: Mapping[str, object]) -> SteeringMethod:
        """The method built from parameter values by name (unknown, missing or mistyped ones: one line)."""
        declared = cls.parameters()
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ValueError(f"method {cls.name!r} has no parameter {unknown[0]!r}; its parameters: "
                             f"{', '.join(declared) or 'none'}")
        missing = [p.name for p in declared.values() if p.required and p.name not in values]
        if missing:
            raise ValueError(f"method {cls.name!r} needs parameter {missing[0]!r}")
        return cls(**{k: declared[k].check(v, cls.name) for k, v in values.items()})

    def scaled(self, factor: float) -> SteeringMethod:
        """The method with its strength multiplied by ``factor`` (unchanged without a strength)."""
        if self.strength is None:
            return self
        return replace(self, **{self.strength: float(getattr(self, self.strength)) * factor})  # type: ignore[type-var]

    @abstractmethod
    def lower(self, vector: Tensor) -> Lowered:
        """The table row and per-token scalars for ``vector`` [D] fp32."""


METHODS: dict[str, type[SteeringMethod]] = {}


def register_method(cls: type[SteeringMethod]) -> type[SteeringMethod]:
    """Make a method available by its ``name`` to ``SteerOp(mode=...)`` and everything built on it (HTTP, CLI,
    vLLM). Its parameters and features are checked here, once."""
    if not getattr(cls, "name", None) or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute name")
    if not is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"{cls.__name__} must be a frozen dataclass (its fields are the method's parameters)")
    params = cls.parameters()
    if cls.strength is not None and (cls.strength not in params or params[cls.strength].type is not float):
        raise ValueError(f"method {cls.name!r}: strength {cls.strength!r} must name one of its float parameters")
    if not cls.features <= OP_FEATURES:
        raise ValueError(f"method {cls.name!r} uses op features {sorted(cls.features - OP_FEATURES)}; the op has "
                         f"{sorted(OP_FEATURES)}")
    METHODS[cls.name] = cls
    return cls


def parse_params(mode: str, texts: Iterable[str]) -> dict[str, Any]:
    """``NAME=VALUE`` texts (``--param value=2.5``) as method ``mode``'s parameters, each read as its declared
    type (``true``/``false`` for bool, ``none`` for an optional one); one-line error otherwise."""
    declared = method_named(mode).parameters()
    out: dict[str, Any] = {}
    for text in texts:
        name, eq, raw = str(text).partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"parameter {text!r}: expected NAME=VALUE")
        if name not in declared:
            raise ValueError(f"method {mode!r} has no parameter {name!r}; its parameters: "
                             f"{', '.join(declared) or 'none'}")
        p = declared[name]
        value: Any = raw.strip()
        try:
            if p.optional and value.lower() in ("none", "null"):
                value = None
            elif p.type is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError("expected true or false")
                value = value.lower() == "true"
            elif p.type in (int, float):
                value = p.type(value)
        except ValueError as exc:
            raise ValueError(f"parameter {text!r}: {exc}") from None
        out[name] = p.check(value, mode)
    return out


def method_named(mode: str) -> type[SteeringMethod]:
    """The registered method class called ``mode`` (one-line error naming the registered ones)."""
    if not isinstance(mode, str) or mode not in METHODS:
        raise ValueError(f"unknown steering mode {mode!r}; choose from {tuple(METHODS)}")
    return METHODS[mode]


@register_method
@dataclass(frozen=True)
class Add(SteeringMethod):
    """``h + coef * v`` (``v`` as given, not normalised)."""

    name: ClassVar[str] = "add"
    strength: ClassVar[str | None] = "coef"
    features: ClassVar[frozenset[str]] = frozenset({"add"})
    coef: float = 1.0

    def lower(self, vector):
        return Lowered(vector.float(), self.coef)


@register_method
@dataclass(frozen=True)
class Ablate(SteeringMethod):
    """Remove the component along ``v``: a cap of the projection on the unit vector to ``[0, 0]``."""

    name: ClassVar[str] = "ablate"
    features: ClassVar[frozenset[str]] = frozenset({"cap"})

    def lower(self, vector):
        return Lowered(unit(vector), 0.0, 0.0, 0.0)


@register_method
@dataclass(frozen=True)
class Cap(SteeringMethod):
    """Clamp the projection on the unit vector into ``[cap_min, cap_max]`` (None: unbounded on that side)."""

    name: ClassVar[str] = "cap"
    features: ClassVar[frozenset[str]] = frozenset({"cap"})
    cap_min: float | None = None
    cap_max: float | None = None

    def __post_init__(self) -> None:
        if self.cap_min is None and self.cap_max is None:
            raise ValueError("mode 'cap' needs cap_min and/or cap_max")
        if self.cap_min is not None and self.cap_max is not None and self.cap_min > self.cap_max:
            raise ValueError(f"cap_min ({self.cap_min}) must be <= cap_max ({self.cap_max})")

    def lower(self, vector):
        return Lowered(unit(vector), 0.0, -INF if self.cap_min is None else float(self.cap_min),
                       INF if self.cap_max is None else float(self.cap_max))


@dataclass(frozen=True)
class Condition:
    """Steer only where the token's projection on a unit direction lies in ``[above, below]``.

    Evaluated at the layer of the edit it gates, on the hidden state entering that edit (see the module
    docstring). ``above=T`` alone: open where the projection is >= T; ``below=T`` alone: <= T; both: a band.

    Attributes:
        vector: ``[d_model]`` condition direction at the edit's layer (any norm; its unit version is used).
        above: lower threshold, or None.
        below: upper threshold, or None.
        latch: once open at a token of a row, stay open for the rest of that row's generation.
    """

    vector: Tensor
    above: float | None = None
    below: float | None = None
    latch: bool = False

    def __post_init__(self) -> None:
        if self.above is None and self.below is None:
            raise ValueError("a condition needs a threshold: above and/or below")
        for name in ("above", "below"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), f"condition threshold {name!r}")
        if not isinstance(self.latch, bool):
            raise ValueError(f"latch must be true or false, got {self.latch!r}")
        check_vector(self.vector, name="condition vector")
        object.__setattr__(self, "vector", self.vector.detach().clone())

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)`` of the gate (``-inf``/``+inf`` for a side without a threshold)."""
        return (-INF if self.above is None else float(self.above), INF if self.below is None else float(self.below))


class PositionRule(ABC):
    """Which tokens of a row an edit touches, as an interval of absolute positions.

    A rule is written as text ``name`` or ``name:ARG``; ``parse`` reads ``ARG`` (None when there is none) and
    ``spec`` writes the rule back. ``requires`` names what a consumer must support to apply it (see
    ``Support``).
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    # How the rule is written, for error messages and help texts ("first:N").
    syntax: ClassVar[str] = ""

    @classmethod
    def parse(cls, arg: str | None) -> PositionRule:
        """The rule for the text after ``name:`` (None: the bare name). The default takes no argument."""
        if arg is not None:
            raise ValueError(f"positions {cls.name!r} take no argument, got {cls.name}:{arg}")
        return cls()

    @abstractmethod
    def interval(self, prompt_len: int, marker: int | None = None) -> tuple[int, int]:
        """``[start, end)`` for a row whose prompt has ``prompt_len`` tokens (``NO_END``: open);
        ``marker`` is the position a marker string was first generated at, when a rule needs one."""

    def spec(self) -> str:
        """The rule written as ``position_rule`` reads it back (``"response"``, ``"first:8"``...)."""
        return self.name


POSITION_RULES: dict[str, type[PositionRule]] = {}


def register_positions(cls: type[PositionRule]) -> type[PositionRule]:
    """Make a position rule available by its ``name`` (the prefix it is written with)."""
    if not getattr(cls, "name", None) or ":" in cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name without ':'")
    POSITION_RULES[cls.name] = cls
    return cls


def _count(text: str | None, what: str) -> int:
    if text is None or not text.strip().isdigit():
        raise ValueError(f"{what} must be an int >= 0, got {text!r}")
    return int(text)


@register_positions
@dataclass(frozen=True)
class AllPositions(PositionRule):
    """Every token: ``[0, inf)``."""

    name: ClassVar[str] = "all"

    def interval(self, prompt_len, marker=None):
        return 0, NO_END


@register_positions
@dataclass(frozen=True)
class PromptPositions(PositionRule):
    """The prompt's tokens: ``[0, P)``."""

    name: ClassVar[str] = "prompt"

    def interval(self, prompt_len, marker=None):
        return 0, prompt_len


@register_positions
@dataclass(frozen=True)
class ResponsePositions(PositionRule):
    """The generated tokens: ``[P, inf)``."""

    name: ClassVar[str] = "response"

    def interval(self, prompt_len, marker=None):
        return prompt_len, NO_END


@register_positions
@dataclass(frozen=True)
class FirstGenerated(PositionRule):
    """The first ``n`` generated tokens: ``[P, P + n)``."""

    n: int
    name: ClassVar[str] = "first"
    syntax: ClassVar[str] = "first:N"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"the number of generated tokens must be an int >= 0, got {self.n!r}")

    @classmethod
    def parse(cls, arg):
        return cls(_count(arg, "the number of generated tokens"))

    def interval(self, prompt_len, marker=None):
        return prompt_len, prompt_len + self.n

    def spec(self) -> str:
        return f"first:{self.n}"


@register_positions
@dataclass(frozen=True)
class GeneratedWindow(PositionRule):
    """Generated tokens ``start`` (inclusive) to ``end`` (exclusive), counted from 0: ``[P + start, P + end)``."""

    start: int
    end: int
    name: ClassVar[str] = "window"
    syntax: ClassVar[str] = "window:A-B"

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"window bounds must be ints >= 0, got {self.start!r}..{self.end!r}")
        if self.end < self.start:
            raise ValueError(f"window end ({self.end}) is before its start ({self.start})")

    @classmethod
    def parse(cls, arg):
        a, _, b = (arg or "").partition("-")
        return cls(_count(a, "window start"), _count(b, "window end"))

    def interval(self, prompt_len, marker=None):
        return prompt_len + self.start, prompt_len + self.end

    def spec(self) -> str:
        return f"window:{self.start}-{self.end}"


@register_positions
@dataclass(frozen=True)
class FromMarker(PositionRule):
    """From the first generated occurrence of ``text`` on: ``[M, inf)``, where ``M`` is the absolute position of
    the first token after the one that completed the marker (set by the host when the text appears); nothing
    before the marker has appeared."""

    text: str
    name: ClassVar[str] = "marker"
    syntax: ClassVar[str] = "marker:TEXT"
    requires: ClassVar[frozenset[str]] = frozenset({"markers"})

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise ValueError("a marker must be a non-empty string")

    @classmethod
    def parse(cls, arg):
        return cls(arg or "")

    def interval(self, prompt_len, marker=None):
        return (NO_END, NO_END) if marker is None else (int(marker), NO_END)

    def spec(self) -> str:
        return f"marker:{self.text}"


def position_syntax() -> str:
    """Every registered rule as it is written (``all``, ``prompt``, ..., ``first:N``...), for help and errors."""
    return ", ".join(cls.syntax or cls.name for cls in POSITION_RULES.values())


def position_rule(positions: str | PositionRule) -> PositionRule:
    """The rule object for its text (``"response"``, ``"first:8"``: the registered rule named by the prefix
    parses the rest) or the rule itself."""
    if isinstance(positions, PositionRule):
        return positions
    if not isinstance(positions, str):
        raise ValueError(f"positions must be a rule or its text ({position_syntax()}), got {positions!r}")
    kind, colon, arg = positions.partition(":")
    cls = POSITION_RULES.get(kind)
    if cls is None:
        raise ValueError(f"unknown positions {positions!r}; choose from {position_syntax()}")
    try:
        return cls.parse(arg if colon else None)
    except ValueError as exc:
        raise ValueError(f"positions {positions!r}: {exc}") from None


def build_method(mode: str, coef: float = 1.0, cap_min: float | None = None, cap_max: float | None = None,
                 params: Mapping[str, Any] | None = None) -> SteeringMethod:
    """The method ``mode`` from the generic fields every front end carries and the method's own ``params``:
    ``coef`` sets its strength, ``cap_min``/``cap_max`` the parameters of those names, ``params`` override
    both (the one place ``SteerOp``, the HTTP schema and the CLI turn their fields into a method)."""
    cls = method_named(mode)
    declared = cls.parameters()
    values: dict[str, Any] = {}
    if cls.strength is not None:
        values[cls.strength] = float(coef)
    values.update({k: v for k, v in (("cap_min", cap_min), ("cap_max", cap_max)) if k in declared and v is not None})
    values.update(params or {})
    return cls.from_params(values)


@dataclass(frozen=True)
class SteerOp:
    """One edit at one layer: the user-facing steering spec.

    Attributes:
        layer: residual-stream layer, 1..n_layers.
        vector: [d_model] direction (any norm; ``add`` uses it as given, ``ablate``/``cap`` its unit version).
            A detached copy is kept, so changing the caller's tensor later changes nothing here.
        mode: a registered method name: "add" (h + coef * v), "ablate" (remove the component along v),
            "cap" (clamp <h, v/|v|>), or one registered with ``register_method``.
        coef: the method's strength (``SteeringMethod.strength``: ``add``'s scale); ignored by a method
            without one.
        cap_min, cap_max: shorthand for the parameters of those names (``cap``'s bounds; None: unbounded);
            ignored by a method without them.
        positions: which tokens the edit touches (a rule's text, e.g. ``"first:8"``, or a ``PositionRule``).
        when: a ``Condition`` gating the edit per token (evaluated at this op's layer), or None.
        params: the method's own parameters by name (they override ``coef``/``cap_min``/``cap_max``); a name
            the method does not declare is refused.
    """

    layer: int
    vector: Tensor
    mode: str = "add"
    coef: float = 1.0
    cap_min: float | None = None
    cap_max: float | None = None
    positions: str | PositionRule = "all"
    when: Condition | None = None
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        method_named(self.mode)
        position_rule(self.positions)
        check_number(self.coef, f"steering coefficient at layer {self.layer}")
        for name in ("cap_min", "cap_max"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name)
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params must be a mapping of parameter names to values, got {self.params!r}")
        object.__setattr__(self, "params", dict(self.params))
        check_vector(self.vector, name=f"steering vector at layer {self.layer}")
        # Built now, so a missing or mistyped parameter fails at construction, in one line.
        object.__setattr__(self, "_method", build_method(self.mode, self.coef, self.cap_min, self.cap_max,
                                                         self.params))
        object.__setattr__(self, "vector", self.vector.detach().clone())
        if self.when is not None:
            if not isinstance(self.when, Condition):
                raise ValueError(f"when must be a Condition, got {type(self.when).__name__}")
            if self.when.vector.shape != self.vector.shape:
                raise ValueError(f"the condition vector has width {self.when.vector.shape[-1]} but the steering "
                                 f"vector has width {self.vector.shape[-1]}")

    @property
    def method(self) -> SteeringMethod:
        """The steering method object this spec names, with its parameters."""
        return self._method  # type: ignore[attr-defined]

    def method_params(self) -> dict[str, Any]:
        """The method's parameters by name, as built (what a spec or request carries to rebuild the edit)."""
        return {f.name: getattr(self.method, f.name) for f in fields(self.method)}  # type: ignore[arg-type]

    @property
    def rule(self) -> PositionRule:
        return position_rule(self.positions)

    def with_strength(self, value: float) -> SteerOp:
        """The same op with its method's strength set to ``value`` (a per-row coefficient); a method without a
        strength takes only 0 (off) or 1 (as is), per-row caps and ablations being all or nothing."""
        cls = METHODS[self.mode]
        if cls.strength is None:
            if value not in (0.0, 1.0):
                raise ValueError(f"a per-row coefficient of {value:g} for a {self.mode!r} op: a method without a "
                                 "strength is all or nothing (0 or 1)")
            return self
        return replace(self, params={**self.method_params(), cls.strength: float(value)})


@dataclass(frozen=True)
class Edit:
    """A lowered ``SteerOp``: what the plan stores for one edit of one row at one layer.

    Attributes:
        layer: residual layer 1..n_layers.
        key: content digest of ``row`` (rows with the same vector share one table entry).
        row: [D] fp32 CPU table row.
        coef, lo, hi: per-token scalars of the per-row op.
        rule: the position rule.
        gate_key, gate_row: digest and [D] fp32 unit direction of the condition, or None (ungated).
        gate_lo, gate_hi: the gate's bounds on the projection.
        latch: the gate stays open for a row once it has opened.
    """

    layer: int
    key: str
    row: Tensor
    coef: float
    lo: float
    hi: float
    rule: PositionRule
    gate_key: str | None = None
    gate_row: Tensor | None = None
    gate_lo: float = -INF
    gate_hi: float = INF
    latch: bool = False

    def with_coef(self, coef: float) -> Edit:
        """The same edit with another coefficient (per-row coefficients of one shared spec)."""
        return replace(self, coef=float(coef))

    def needs(self) -> frozenset[str]:
        """What a consumer must support to apply this edit (see ``Support``): its rule's requirements, "gates"
        and "latches" for a condition, and the op features its scalars use ("add", "cap")."""
        out = set(self.rule.requires)
        if self.gate_key is not None:
            out.add("gates")
        if self.latch:
            out.add("latches")
        if self.coef != 0.0:
            out.add("add")
        if self.lo != -INF or self.hi != INF:
            out.add("cap")
        return frozenset(out)


def lower_op(op: SteerOp) -> Edit:
    """Lower one ``SteerOp`` through its method."""
    low = op.method.lower(op.vector.detach().float().cpu())
    row = low.row.detach().float().cpu().contiguous()
    if not bool(torch.isfinite(row).all()):
        raise ValueError(f"steering vector at layer {op.layer} lowers to non-finite values (a zero vector "
                         f"cannot be normalised for {op.mode!r})")
    for name, value in (("coefficient", low.coef), ("cap_min", low.lo), ("cap_max", low.hi)):
        if math.isnan(value):
            raise ValueError(f"{name} of the {op.mode!r} edit at layer {op.layer} is NaN")
    if low.lo > low.hi:
        raise ValueError(f"cap_min ({low.lo}) must be <= cap_max ({low.hi})")
    key = hashlib.blake2b(row.numpy().tobytes(), digest_size=12).hexdigest()
    if op.when is None:
        return Edit(op.layer, key, row, float(low.coef), float(low.lo), float(low.hi), op.rule)
    gate_row = unit(op.when.vector.detach().float().cpu()).contiguous()
    gate_key = hashlib.blake2b(gate_row.numpy().tobytes(), digest_size=12).hexdigest()
    glo, ghi = op.when.bounds
    return Edit(op.layer, key, row, float(low.coef), float(low.lo), float(low.hi), op.rule, gate_key, gate_row,
                glo, ghi, op.when.latch)


def lower_ops(ops: Sequence[SteerOp]) -> list[Edit]:
    """Lower every op, in order."""
    return [lower_op(op) for op in ops]


# What each requirement is, for the one refusal message.
_NEEDS_WORDS = {"markers": "marker positions", "gates": "conditions (when)", "latches": "latched conditions",
                "add": "added vectors", "cap": "projection caps"}


class SteeringNotSupported(ValueError):
    """Steering a consumer cannot apply (``check_supported``): raised before any work starts."""


@dataclass(frozen=True)
class Support:
    """What one consumer of the plan can apply; ``check_supported`` refuses the rest, in one message.

    Attributes:
        where: the consumer, as the message names it ("the compiled path", "the vLLM engine"...).
        markers: position rules that start at a generated marker (the host watches the text between steps).
        gates: conditions (``when``).
        latches: latched conditions.
        features: the per-row op's arguments it passes (``OP_FEATURES``).
    """

    where: str
    markers: bool = True
    gates: bool = True
    latches: bool = True
    features: frozenset[str] = OP_FEATURES

    def has(self, need: str) -> bool:
        if need in OP_FEATURES:
            return need in self.features
        return bool(getattr(self, need, False))


def check_supported(edits: Iterable[Edit], support: Support) -> None:
    """Refuse, before any work, an edit ``support``'s consumer cannot apply (the same message on every path).

    Raises:
        SteeringNotSupported: ``"<where> cannot apply marker positions (edit 2 at layer 16: 'marker:</think>')"``.
    """
    for i, e in enumerate(edits):
        missing = sorted(n for n in e.needs() if not support.has(n))
        if missing:
            raise SteeringNotSupported(f"{support.where} cannot apply {_NEEDS_WORDS.get(missing[0], missing[0])} "
                                      f"(edit {i} at layer {e.layer}: positions {e.rule.spec()!r})")


@dataclass(frozen=True)
class PlanCapacity:
    """The fixed size of a plan that never re-allocates (what a CUDA graph or a replayed record needs).

    Attributes:
        layers: the layers the plan can edit (1-based); each owns ``slots`` slots whatever the rows ask.
        rows: batch rows (requests) per forward pass; one more, always "no edit", is added for padding tokens.
        tokens: tokens per forward pass.
        slots: edits one row may make at one layer.
        table_rows: steering-table rows per layer, row 0 ("no edit") included.
        gate_rows: condition directions per layer.
        readout_dirs: read-out directions ``K``: every layer's op writes ``[tokens, K]`` projections.
    """

    layers: tuple[int, ...]
    rows: int
    tokens: int
    slots: int = 2
    table_rows: int = 64
    gate_rows: int = 8
    readout_dirs: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        for name in ("rows", "tokens", "slots", "gate_rows", "readout_dirs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"plan capacity {name} must be an int >= 1, got {value!r}")
        if isinstance(self.table_rows, bool) or not isinstance(self.table_rows, int) or self.table_rows < 2:
            raise ValueError(f"plan capacity table_rows must be an int >= 2 (row 0 is 'no edit'), "
                             f"got {self.table_rows!r}")
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"plan capacity layers must be 1-based layer numbers, got {self.layers!r}")


# Per (slot, row) parameter defaults: "no edit" (table row 0, nothing added, bounds open, no gate, no latch).
_PARAM_DEFAULTS: dict[str, tuple[float | int | bool, torch.dtype]] = {
    "entry": (0, torch.int64), "coef": (0.0, torch.float32), "lo": (-INF, torch.float32),
    "hi": (INF, torch.float32), "start": (0, torch.int64), "end": (0, torch.int64),
    "gentry": (-1, torch.int64), "glo": (-INF, torch.float32), "ghi": (INF, torch.float32),
    "latch": (False, torch.bool),
}


@dataclass
class _LayerState:
    """One steered layer: its table, the plan rows of its slots, and which op arguments the slots use."""

    table: Tensor  # [V, D] fp32 on the device, row 0 zeros
    slots: range  # rows of the plan's parameter matrices
    adds: list[bool] = field(default_factory=list)  # per slot: some row adds
    caps: list[bool] = field(default_factory=list)  # per slot: some row has a finite bound
    gates: list[bool] = field(default_factory=list)  # per slot: some row's edit is gated
    gate_table: Tensor | None = None  # [G, D] fp32 unit condition directions of this layer, or None


class SteeringPlan:
    """Per-layer vector tables and per-token op arguments for a batch of rows.

    Two modes, one meaning:

    * **growing** (``capacity=None``, the eager editor, compiled path and HF engine): tables hold what the rows
      use, slot counts follow the rows, buffers grow when a pass is larger;
    * **fixed** (``capacity=PlanCapacity(...)``, the vLLM worker): every tensor is allocated once, in
      ``__init__``, and never moves. ``set_rows``, ``fill``, ``write_row`` and ``set_readout`` write in place;
      every layer of the capacity has ``slots`` slots whether a row uses them or not (unused: table row 0,
      coefficient 0, bounds open, gate index -1); ``apply`` runs the op with every argument, gates and read-out
      included, so nothing it launches depends on what the rows ask. A captured graph (or a replayed record of
      the ops) therefore stays valid for any later rows.

    Args:
        d_model: hidden width.
        device: where the tables and buffers live.
        max_tokens: tokens per forward pass the buffers hold at first (growing mode; they grow when a pass is
            larger).
        capacity: the fixed size (fixed mode), or None (growing mode).
        backend: the op's backend; in fixed mode it is resolved once, here, and the same for every call.
    """

    def __init__(self, d_model: int, device: torch.device | str, *, max_tokens: int = 256,
                 capacity: PlanCapacity | None = None, backend: str = "auto"):
        self.d_model = d_model
        self.device = torch.device(device)
        self.capacity = capacity
        self.layers: dict[int, _LayerState] = {}
        self.active_layers: set[int] = set()  # layers some row of the last set_rows edits (host-side)
        self._max_tokens = max(1, max_tokens)
        self._n_slots = 0
        self._params: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        self._proj: dict[int, Tensor] = {}
        self._n = 0
        self._has_gates = False
        self._slot_latch: list[bool] = []  # per slot: some row's gate latches
        # [n_slots, n_rows] uint8: 1 where a latching gate has opened for that row (kept on the device).
        self._latched = torch.zeros((0, 1), dtype=torch.uint8, device=self.device)
        self._edit_slots: list[list[int]] = []  # per row, the plan slot of each of its edits
        self._backend = backend
        if capacity is not None:
            self._allocate(capacity)

    @property
    def fixed(self) -> bool:
        """Whether the plan was allocated once with a ``PlanCapacity`` (its tensors never move)."""
        return self.capacity is not None

    def _allocate(self, cap: PlanCapacity) -> None:
        """Allocate every tensor of a fixed plan, once."""
        dev, d, s_per = self.device, self.d_model, cap.slots
        # Chosen once: the op must launch the same kernel on every call, graph-captured or not.
        self._backend = resolve_backend(self._backend, torch.empty((0, d), device=dev))
        self._layer_index = {layer: i for i, layer in enumerate(cap.layers)}
        self._row_keys: dict[int, list[str | None]] = {}
        self._gate_keys: dict[int, list[str | None]] = {}
        for i, layer in enumerate(cap.layers):
            state = _LayerState(torch.zeros(cap.table_rows, d, device=dev), range(i * s_per, (i + 1) * s_per),
                                [True] * s_per, [True] * s_per, [True] * s_per,
                                torch.zeros(cap.gate_rows, d, device=dev))
            self.layers[layer] = state
            self._row_keys[layer] = [""] + [None] * (cap.table_rows - 1)  # row 0: "no edit", never reassigned
            self._gate_keys[layer] = [None] * cap.gate_rows
        self._n_slots = len(cap.layers) * s_per
        self._has_gates = True
        self._slot_latch = [True] * self._n_slots
        shape = (self._n_slots, cap.rows + 1)
        self._params = {name: torch.full(shape, fill, dtype=dtype, device=dev)
                        for name, (fill, dtype) in _PARAM_DEFAULTS.items()}
        self._latched = torch.zeros(shape, dtype=torch.uint8, device=dev)
        self._max_tokens = cap.tokens
        self._allocate_buffers()
        self._readout = torch.zeros(cap.readout_dirs, d, device=dev)
        # One [tokens, K] read-out per layer: every layer's op writes its own, the caller reads the one it wants
        # after the forward (which layer is read is a host choice that no captured graph needs to know).
        self._proj_all = torch.zeros(len(cap.layers), cap.tokens, cap.readout_dirs, device=dev)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the plan owns, by name (tables, parameters, per-token buffers, latches, read-out)."""
        out = {f"table.{layer}": st.table for layer, st in self.layers.items()}
        out.update({f"gate_table.{layer}": st.gate_table for layer, st in self.layers.items()
                    if st.gate_table is not None})
        out.update({f"param.{k}": v for k, v in self._params.items()})
        out.update({f"buffer.{k}": v for k, v in self._buffers.items()})
        out["latched"] = self._latched
        if self._buffers:
            out["row_of_token"] = self._row_buffer
        if self.fixed:
            out["readout"] = self._readout
            out["proj"] = self._proj_all
        return out

    def write_row(self, layer: int, row: int, vector: Tensor, key: str | None = None) -> None:
        """Write ``vector`` [D] into table row ``row`` of ``layer``, in place (fixed mode). With ``key`` (the
        content digest ``Edit.key``), ``set_rows`` finds the vector there and writes nothing for it."""
        table = self._fixed_table(layer)
        if not 1 <= row < table.shape[0]:
            raise ValueError(f"table row {row} is outside 1..{table.shape[0] - 1} (row 0 is 'no edit')")
        table[row].copy_(vector.to(table.dtype))
        self._row_keys[layer][row] = key

    def write_gate_row(self, layer: int, row: int, direction: Tensor, key: str | None = None) -> None:
        """Write a unit condition ``direction`` [D] into gate row ``row`` of ``layer``, in place (fixed mode)."""
        self._fixed_table(layer)
        table = self.layers[layer].gate_table
        assert table is not None
        if not 0 <= row < table.shape[0]:
            raise ValueError(f"gate row {row} is outside 0..{table.shape[0] - 1}")
        table[row].copy_(direction.to(table.dtype))
        self._gate_keys[layer][row] = key

    def _fixed_table(self, layer: int) -> Tensor:
        if not self.fixed:
            raise ValueError("write_row needs a fixed plan (capacity=PlanCapacity(...))")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not one of the plan's layers {self.capacity.layers}")
        return self.layers[layer].table

    def set_readout(self, directions: Tensor | None) -> None:
        """Write read-out directions ``[k, D]`` (k <= K) into the fixed read-out buffer, the rest zeros."""
        if not self.fixed:
            raise ValueError("set_readout needs a fixed plan (capacity=PlanCapacity(...))")
        self._readout.zero_()
        if directions is None:
            return
        k = directions.shape[0]
        if directions.ndim != 2 or directions.shape[1] != self.d_model or k > self._readout.shape[0]:
            raise ValueError(f"read-out directions must be [k, {self.d_model}] with k <= {self._readout.shape[0]}, "
                             f"got {list(directions.shape)}")
        self._readout[:k].copy_(directions.to(self._readout.dtype))

    def readout_values(self, layer: int) -> Tensor:
        """The fixed plan's read-out buffer ``[tokens, K]`` of ``layer`` (valid for the last pass's tokens)."""
        return self._proj_all[self._layer_index[layer]]

    # -- rows -----------------------------------------------------------------------------------------
    def set_rows(self, rows: Sequence[Sequence[Edit]], prompt_lens: Sequence[int],
                 markers: Sequence[int | None] | None = None,
                 latched: Sequence[set[int]] | None = None,
                 moved_from: Sequence[int | None] | None = None) -> None:
        """Describe the batch: row ``r`` makes ``rows[r]``'s edits and has a prompt of ``prompt_lens[r]`` tokens.

        Runs on the host once per change of the batch's rows (not per forward pass).

        Args:
            rows: each batch row's lowered edits.
            prompt_lens: each row's prompt length ``P``.
            markers: per row, the absolute position a ``FromMarker`` rule starts at (None: not seen yet).
            latched: per row, the indices into ``rows[r]`` of edits whose latching gate has already opened (from
                ``latched_edits()`` of the rows as they were); default: nothing latched.
            moved_from: fixed mode only: per row, the row it was at in the previous ``set_rows`` (None: new), so
                its latched gates follow it on the device without a read back to the host.
        """
        if len(prompt_lens) != len(rows):
            raise ValueError(f"got {len(rows)} rows but {len(prompt_lens)} prompt lengths")
        markers = list(markers) if markers is not None else [None] * len(rows)
        if self.capacity is not None:
            self._set_rows_fixed(rows, prompt_lens, markers, latched, moved_from)
            return
        if moved_from is not None:
            raise ValueError("moved_from needs a fixed plan (capacity=PlanCapacity(...))")
        per_layer: dict[int, list[list[Edit]]] = {}
        for r, edits in enumerate(rows):
            for e in edits:
                per_layer.setdefault(e.layer, [[] for _ in rows])[r].append(e)
        n_rows = max(1, len(rows))
        pad = n_rows - len(rows)
        entry, coef, lo, hi, start, end = [], [], [], [], [], []
        gentry, glo, ghi, latch = [], [], [], []
        layers: dict[int, _LayerState] = {}
        for layer in sorted(per_layer):
            by_row = per_layer[layer]
            keys: dict[str, int] = {}
            vectors: list[Tensor] = []
            gate_keys: dict[str, int] = {}
            gate_rows: list[Tensor] = []
            for edits in by_row:
                for e in edits:
                    if e.key not in keys:
                        keys[e.key] = len(vectors) + 1
                        vectors.append(e.row)
                    if e.gate_key is not None and e.gate_key not in gate_keys:
                        gate_keys[e.gate_key] = len(gate_rows)
                        gate_rows.append(e.gate_row)
            table = self._table(layer, vectors)
            first = len(entry)
            state = _LayerState(table, range(first, first + max(len(x) for x in by_row)))
            if gate_rows:
                state.gate_table = torch.stack(gate_rows).to(self.device, torch.float32).contiguous()
            for s in range(len(state.slots)):
                cols = [x[s] if s < len(x) else None for x in by_row]
                entry.append([keys[e.key] if e else 0 for e in cols] + [0] * pad)
                coef.append([e.coef if e else 0.0 for e in cols] + [0.0] * pad)
                lo.append([e.lo if e else -INF for e in cols] + [-INF] * pad)
                hi.append([e.hi if e else INF for e in cols] + [INF] * pad)
                spans = [e.rule.interval(int(prompt_lens[r]), markers[r]) if e else (0, 0)
                         for r, e in enumerate(cols)] + [(0, 0)] * pad
                start.append([a for a, _ in spans])
                end.append([b for _, b in spans])
                gated = [e if e is not None and e.gate_key is not None else None for e in cols]
                gentry.append([gate_keys[e.gate_key] if e else -1 for e in gated] + [-1] * pad)  # type: ignore[index]
                glo.append([e.gate_lo if e else -INF for e in gated] + [-INF] * pad)
                ghi.append([e.gate_hi if e else INF for e in gated] + [INF] * pad)
                latch.append([bool(e and e.latch) for e in gated] + [False] * pad)
                state.adds.append(any(e is not None and e.coef != 0.0 for e in cols))
                state.caps.append(any(e is not None and (e.lo != -INF or e.hi != INF) for e in cols))
                state.gates.append(any(e is not None for e in gated))
            layers[layer] = state
        self.layers = layers
        self.active_layers = set(layers)
        self._n_slots = len(entry)
        self._has_gates = any(any(st.gates) for st in layers.values())
        self._slot_latch = [any(x) for x in latch]
        dev = self.device
        if entry:
            self._params = {
                "entry": torch.tensor(entry, dtype=torch.int64, device=dev),
                "coef": torch.tensor(coef, dtype=torch.float32, device=dev),
                "lo": torch.tensor(lo, dtype=torch.float32, device=dev),
                "hi": torch.tensor(hi, dtype=torch.float32, device=dev),
                "start": torch.tensor(start, dtype=torch.int64, device=dev),
                "end": torch.tensor(end, dtype=torch.int64, device=dev),
            }
            if self._has_gates:
                self._params.update({
                    "gentry": torch.tensor(gentry, dtype=torch.int64, device=dev),
                    "glo": torch.tensor(glo, dtype=torch.float32, device=dev),
                    "ghi": torch.tensor(ghi, dtype=torch.float32, device=dev),
                    "latch": torch.tensor(latch, dtype=torch.bool, device=dev),
                })
        else:
            self._params = {}
        # Which plan slot each row's edit landed in: edit k of row r is the s-th of that row at its layer.
        self._edit_slots = []
        for edits in rows:
            seen: dict[int, int] = {}
            slots_of_row = []
            for e in edits:
                s_in_layer = seen.get(e.layer, 0)
                seen[e.layer] = s_in_layer + 1
                slots_of_row.append(layers[e.layer].slots.start + s_in_layer)
            self._edit_slots.append(slots_of_row)
        # A new set of rows starts with no gate latched, unless the caller carries the state over.
        shape = (len(entry), n_rows)
        if tuple(self._latched.shape) == shape:
            self._latched.zero_()  # same address: a graph that captured it stays valid
        else:
            self._latched = torch.zeros(shape, dtype=torch.uint8, device=dev)
        if latched is not None:
            if len(latched) != len(rows):
                raise ValueError(f"got latch state for {len(latched)} rows but {len(rows)} rows")
            for r, ks in enumerate(latched):
                for k in ks:
                    self._latched[self._edit_slots[r][k], r] = 1
        if self._has_gates and "gindex" not in self._buffers:
            self._buffers = {}  # gate buffers are allocated with the others
        self._ensure_buffers(self._max_tokens)

    def _table(self, layer: int, vectors: list[Tensor]) -> Tensor:
        """The layer's table [V, D] with row 0 zeros (growing mode: sized to what the rows use)."""
        rows = [torch.zeros(self.d_model), *vectors]
        return torch.stack(rows).to(self.device, torch.float32).contiguous()

    def _set_rows_fixed(self, rows: Sequence[Sequence[Edit]], prompt_lens: Sequence[int],
                        markers: Sequence[int | None], latched: Sequence[set[int]] | None,
                        moved_from: Sequence[int | None] | None) -> None:
        """``set_rows`` of a fixed plan: host work, then in-place writes into the tensors allocated once."""
        cap = self.capacity
        assert cap is not None
        if len(rows) > cap.rows:
            raise ValueError(f"got {len(rows)} rows but the plan holds {cap.rows}")
        if moved_from is not None and len(moved_from) != len(rows):
            raise ValueError(f"got {len(moved_from)} previous rows for {len(rows)} rows")
        # Pass 1: which vectors each layer needs, and the slot of every edit (the j-th edit of a row at a layer
        # is that layer's j-th slot: it depends on the row's own edits only, so a row keeps its slots when the
        # batch around it changes).
        needed: dict[int, dict[str, Tensor]] = {}
        gates_needed: dict[int, dict[str, Tensor]] = {}
        edit_slots: list[list[int]] = []
        for r, edits in enumerate(rows):
            seen: dict[int, int] = {}
            slots_of_row = []
            for e in edits:
                if e.layer not in self._layer_index:
                    raise ValueError(f"layer {e.layer} is not one the plan can edit ({cap.layers[0]}.."
                                     f"{cap.layers[-1]})")
                j = seen.get(e.layer, 0)
                if j >= cap.slots:
                    raise ValueError(f"row {r} makes more than {cap.slots} edits at layer {e.layer}; the plan "
                                     f"holds {cap.slots} per layer")
                seen[e.layer] = j + 1
                slots_of_row.append(self.layers[e.layer].slots.start + j)
                needed.setdefault(e.layer, {}).setdefault(e.key, e.row)
                if e.gate_key is not None:
                    gates_needed.setdefault(e.layer, {}).setdefault(e.gate_key, e.gate_row)
            edit_slots.append(slots_of_row)
        entries = {layer: self._place(layer, keys, self._row_keys[layer], self.write_row, "table")
                   for layer, keys in needed.items()}
        gate_entries = {layer: self._place(layer, keys, self._gate_keys[layer], self.write_gate_row, "condition")
                        for layer, keys in gates_needed.items()}
        # Pass 2: the per (slot, row) parameters on the host, then one copy each into the device tensors.
        shape = (self._n_slots, cap.rows + 1)
        host = {name: torch.full(shape, fill, dtype=dtype) for name, (fill, dtype) in _PARAM_DEFAULTS.items()}
        for r, edits in enumerate(rows):
            for e, s in zip(edits, edit_slots[r], strict=True):
                a, b = e.rule.interval(int(prompt_lens[r]), markers[r])
                host["entry"][s, r] = entries[e.layer][e.key]
                host["coef"][s, r], host["lo"][s, r], host["hi"][s, r] = e.coef, e.lo, e.hi
                host["start"][s, r], host["end"][s, r] = a, b
                if e.gate_key is not None:
                    host["gentry"][s, r] = gate_entries[e.layer][e.gate_key]
                    host["glo"][s, r], host["ghi"][s, r], host["latch"][s, r] = e.gate_lo, e.gate_hi, e.latch
        for name, value in host.items():
            self._params[name].copy_(value)
        # Latches: carried with the rows that stay (a gather on the device), zero for new rows.
        if moved_from is None:
            self._latched.zero_()
        else:
            pad = cap.rows  # the padding row never latches: its column is all zeros
            src = [pad if m is None else int(m) for m in moved_from] + [pad] * (cap.rows + 1 - len(rows))
            if any(not 0 <= m <= pad for m in src):
                raise ValueError(f"moved_from must name previous rows 0..{cap.rows - 1}, got {list(moved_from)}")
            self._latched.copy_(self._latched.index_select(1, torch.tensor(src, device=self.device)))
        self._edit_slots = edit_slots
        if latched is not None:
            if len(latched) != len(rows):
                raise ValueError(f"got latch state for {len(latched)} rows but {len(rows)} rows")
            for r, ks in enumerate(latched):
                for k in ks:
                    self._latched[edit_slots[r][k], r] = 1
        self.active_layers = set(needed)

    def _place(self, layer: int, keys: dict[str, Tensor], owner: list[str | None], write, what: str) -> dict[str, int]:
        """Table rows of ``keys`` at ``layer``: a vector already in a row stays there; the others take rows that
        no vector of this batch needs, and are written there in place."""
        where = {k: i for i, k in enumerate(owner) if k}
        missing = [k for k in keys if k not in where]
        if missing:
            free = [i for i, k in enumerate(owner) if k != "" and (k is None or k not in keys)]
            if len(missing) > len(free):
                used = len(keys) + (1 if what == "table" else 0)
                raise ValueError(f"layer {layer} needs {used} {what} rows but the plan holds {len(owner)}; "
                                 "raise the capacity")
            for k, i in zip(missing, free, strict=False):
                write(layer, i, keys[k], k)
                where[k] = i
        return {k: where[k] for k in keys}

    def _ensure_buffers(self, n: int) -> None:
        if self.fixed:
            if n > self._max_tokens:
                raise ValueError(f"a forward pass of {n} tokens exceeds the plan's {self._max_tokens} tokens")
            return
        shape_ok = (self._buffers and self._buffers["index"].shape[0] == self._n_slots
                    and self._buffers["index"].shape[1] >= n)
        if shape_ok:
            return
        self._max_tokens = max(self._max_tokens, n)
        self._allocate_buffers()

    def _allocate_buffers(self) -> None:
        s, t, dev = self._n_slots, self._max_tokens, self.device
        self._buffers = {
            "index": torch.zeros((s, t), dtype=torch.int64, device=dev),
            "coef": torch.zeros((s, t), dtype=torch.float32, device=dev),
            "lo": torch.full((s, t), -INF, dtype=torch.float32, device=dev),
            "hi": torch.full((s, t), INF, dtype=torch.float32, device=dev),
        }
        if self._has_gates:
            self._buffers.update({
                "gindex": torch.full((s, t), -1, dtype=torch.int64, device=dev),
                "glo": torch.full((s, t), -INF, dtype=torch.float32, device=dev),
                "ghi": torch.full((s, t), INF, dtype=torch.float32, device=dev),
                "gopen": torch.ones((s, t), dtype=torch.bool, device=dev),
            })
        self._row_buffer = torch.zeros(t, dtype=torch.int64, device=dev)
        self._proj = {}

    # -- tokens ---------------------------------------------------------------------------------------
    def token_args(self, row_of_token: Tensor, position: Tensor, slots: range | None = None) -> dict[str, Tensor]:
        """Per (slot, token) op arguments ``[n_slots, N]`` as new tensors (the functional form, for graphs).

        Args:
            row_of_token: [N] int64 batch row of each flattened token.
            position: [N] int64 absolute position of each token in its row.
            slots: only these slots (e.g. one layer's ``layers[L].slots``); default all.
        """
        p = self._params
        latched = self._latched
        if slots is not None:
            p = {k: v[slots.start:slots.stop] for k, v in p.items()}
            latched = latched[slots.start:slots.stop]
        start = p["start"][:, row_of_token]
        end = p["end"][:, row_of_token]
        active = (position[None, :] >= start) & (position[None, :] < end)
        args = {
            "index": torch.where(active, p["entry"][:, row_of_token], 0),
            "coef": torch.where(active, p["coef"][:, row_of_token], 0.0),
            "lo": torch.where(active, p["lo"][:, row_of_token], -INF),
            "hi": torch.where(active, p["hi"][:, row_of_token], INF),
        }
        if "gentry" in p:
            # Tokens outside the edit's positions are ungated (and unedited); a latched gate is always open.
            opened = latched[:, row_of_token].bool()
            args["gindex"] = torch.where(active, p["gentry"][:, row_of_token], -1)
            args["glo"] = torch.where(opened, -INF, p["glo"][:, row_of_token])
            args["ghi"] = torch.where(opened, INF, p["ghi"][:, row_of_token])
        return args

    def fill(self, row_of_token: Tensor, position: Tensor) -> None:
        """Write this forward pass's per-token arguments into the preallocated buffers (views ``[:, :N]``)."""
        n = int(row_of_token.shape[0])
        self._n = n
        if not self._n_slots:
            return
        self._ensure_buffers(n)
        self._row_buffer[:n].copy_(row_of_token)
        rows = self._row_buffer[:n]  # on the device whatever the caller passed
        for name, value in self.token_args(rows, position.to(self.device)).items():
            self._buffers[name][:, :n].copy_(value)

    def buffers(self, layer: int) -> list[dict[str, Tensor]]:
        """Per slot at ``layer``, the full-size buffers (``[max_tokens]`` views), for callers that capture."""
        state = self.layers.get(layer)
        if state is None:
            return []
        return [{k: v[s] for k, v in self._buffers.items()} for s in state.slots]

    # -- the op ---------------------------------------------------------------------------------------
    def apply(self, layer: int, hidden: Tensor, readout: Tensor | None = None) -> Tensor | None:
        """Edit ``hidden`` [N, D] (the flattened block output of this pass) in place at ``layer``.

        Uses the arguments of the last ``fill``. Returns the read-out ``[N, K]`` (fp32, taken from the edited
        state before rounding), or None without ``readout``. Under autograd (training) the torch backend runs
        out of place and the caller must use the returned hidden, see ``apply_functional``.
        """
        if self.fixed:
            return self._apply_fixed(layer, hidden)
        state = self.layers.get(layer)
        n = hidden.shape[0]
        if state is None:
            return hidden.float() @ readout.T if readout is not None else None
        if n != self._n:
            raise RuntimeError(f"layer {layer} saw {n} tokens but the plan was filled for {self._n}")
        proj = None
        for j, s in enumerate(state.slots):
            last = j == len(state.slots) - 1
            out = self._proj_buffer(layer, readout, n) if last and readout is not None else None
            b = self._buffers
            steer_rows_(hidden, state.table, b["index"][s, :n], b["coef"][s, :n] if state.adds[j] else None,
                        b["lo"][s, :n] if state.caps[j] else None, b["hi"][s, :n] if state.caps[j] else None,
                        readout if last else None, out, "auto", **self._gate_args(state, j, s, n))
            self._after_gate(state, j, s, n)
            proj = out
        return proj

    def _apply_fixed(self, layer: int, hidden: Tensor) -> Tensor:
        """The fixed plan's edit at ``layer``: the same op calls whatever the rows ask (every slot, every
        argument, gates, latches and read-out), reading only device tensors allocated once; no host read, no
        allocation of its own. Tokens past the last ``fill`` read stale but harmless arguments (a graph warm-up
        pass). Returns the ``[N, K]`` read-out view it wrote."""
        state = self.layers[layer]
        n = hidden.shape[0]
        b = self._buffers
        out = self._proj_all[self._layer_index[layer], :n]
        last = state.slots.stop - 1
        rows = self._row_buffer[:n]
        for s in state.slots:
            steer_rows_(hidden, state.table, b["index"][s, :n], b["coef"][s, :n], b["lo"][s, :n], b["hi"][s, :n],
                        self._readout if s == last else None, out if s == last else None, self._backend,
                        gate_dir=state.gate_table, gate_index=b["gindex"][s, :n], gate_lo=b["glo"][s, :n],
                        gate_hi=b["ghi"][s, :n], gate_out=b["gopen"][s, :n])
            self.latch(s, rows, b["gopen"][s, :n] & (b["gindex"][s, :n] >= 0))
        return out

    def _gate_args(self, state: _LayerState, j: int, s: int, n: int) -> dict[str, Tensor]:
        """The op's gate arguments for slot ``s`` (the ``j``-th of its layer), or none when it is ungated."""
        if not state.gates[j]:
            return {}
        b = self._buffers
        return {"gate_dir": state.gate_table, "gate_index": b["gindex"][s, :n], "gate_lo": b["glo"][s, :n],
                "gate_hi": b["ghi"][s, :n], "gate_out": b["gopen"][s, :n]}

    def _after_gate(self, state: _LayerState, j: int, s: int, n: int) -> None:
        """Latch the rows whose latching gate opened at some token of this pass (on the device, no sync)."""
        if state.gates[j] and self._slot_latch[s]:
            b = self._buffers
            self.latch(s, self._row_buffer[:n], b["gopen"][s, :n] & (b["gindex"][s, :n] >= 0))

    def latch(self, slot: int, row_of_token: Tensor, opened: Tensor) -> None:
        """Record that ``opened`` [N] tokens (of rows ``row_of_token``) passed slot ``slot``'s gate: the rows whose
        edit there latches stay open from the next pass on. Works inside compiled graphs (one scatter)."""
        fired = opened & self._params["latch"][slot][row_of_token]
        self._latched[slot].scatter_reduce_(0, row_of_token, fired.to(torch.uint8), reduce="amax")

    def latching(self, slot: int) -> bool:
        """Whether some row's gate at plan slot ``slot`` latches."""
        return self._slot_latch[slot]

    def latched_edits(self) -> list[set[int]]:
        """Per row of the last ``set_rows``, the indices of its edits whose latching gate has opened (one read of
        device memory: call it when the rows change, not per pass)."""
        state = self._latched.cpu()
        return [{k for k, s in enumerate(slots) if bool(state[s, r])} for r, slots in enumerate(self._edit_slots)]

    def apply_functional(self, layer: int, hidden: Tensor,
                         readout: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """As ``apply`` but out of place and differentiable (torch backend): ``(new hidden, read-out)``."""
        state = self.layers.get(layer)
        if state is None:
            return hidden, (hidden.float() @ readout.T if readout is not None else None)
        n = hidden.shape[0]
        proj = None
        for j, s in enumerate(state.slots):
            last = j == len(state.slots) - 1
            b = self._buffers
            hidden, proj = fused_steer_rows(
                hidden, state.table, b["index"][s, :n], b["coef"][s, :n] if state.adds[j] else None,
                b["lo"][s, :n] if state.caps[j] else None, b["hi"][s, :n] if state.caps[j] else None,
                readout=readout if last else None, inplace=False, validate=False,
                **self._gate_args(state, j, s, n))
            self._after_gate(state, j, s, n)
        return hidden, proj

    def apply_traced(self, layer: int, hidden: Tensor, row_of_token: Tensor, position: Tensor,
                     readout: Tensor | None = None, backend: str = "auto") -> tuple[Tensor, Tensor | None]:
        """The edit at ``layer`` as a traceable function of the pass's tensors (the compiled path's form).

        The per-token arguments come from ``token_args`` inside the graph, each slot runs the functional op
        (``backend="inline"``: the same math as plain torch ops for the compiler to fuse), gates included, and
        latching gates are recorded on the device. No host read, no allocation the graph does not own.

        Args:
            hidden: [N, D] the flattened block output.
            row_of_token: [N] int64 plan row of each token.
            position: [N] int64 absolute position of each token.
            readout: [K, D] fp32 read-out directions, or None.

        Returns:
            ``(new hidden [N, D], read-out [N, K] fp32 or None)``.
        """
        state = self.layers.get(layer)
        if state is None:
            return hidden, (hidden.float() @ readout.T if readout is not None else None)
        args = self.token_args(row_of_token, position, state.slots)
        proj = None
        for j, s in enumerate(state.slots):
            last = j == len(state.slots) - 1
            coef = args["coef"][j] if state.adds[j] else None
            lo, hi = (args["lo"][j], args["hi"][j]) if state.caps[j] else (None, None)
            gate = ({"gate_dir": state.gate_table, "gate_index": args["gindex"][j], "gate_lo": args["glo"][j],
                     "gate_hi": args["ghi"][j]} if state.gates[j] else {})
            mon = readout if last else None
            if backend == "inline":
                hidden, proj, opened = steer_rows_inline(hidden, state.table, args["index"][j], coef, lo, hi, mon,
                                                         **gate)
            else:
                hidden, proj, opened = steer_rows_op(hidden, state.table, args["index"][j], coef, lo, hi, mon,
                                                     backend, **gate)
            if state.gates[j] and self._slot_latch[s]:
                self.latch(s, row_of_token, opened & (args["gindex"][j] >= 0))
        return hidden, proj if readout is not None else None

    def _proj_buffer(self, layer: int, readout: Tensor, n: int) -> Tensor:
        buf = self._proj.get(layer)
        k = readout.shape[0]
        if buf is None or buf.shape[0] < n or buf.shape[1] != k:
            buf = self._proj[layer] = torch.empty((max(n, self._max_tokens), k), dtype=torch.float32,
                                                  device=self.device)
        return buf[:n]
