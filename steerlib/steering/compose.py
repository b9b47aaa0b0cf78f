"""Steering with several vectors at once, with the combination stated: a plain sum, or Gram-Schmidt first.

Each ``Component`` is one trait's vectors with its own coefficient and layers. At every layer ``L`` that some
component names, the components active there, **in the order given**, are combined into one added vector:

* ``method="sum"``: ``delta_L = sum_i c_i * v_i(L)`` (what several add edits at one layer do anyway);
* ``method="orthogonal"``: Gram-Schmidt in the given order, at each layer separately: ``w_1 = v_1``,
  ``w_i = v_i - sum_{j<i} <v_i, e_j> e_j`` with ``e_j = w_j / |w_j|``, then ``delta_L = sum_i c_i * w_i``. The
  first component is used as is; each later one adds only what is new relative to the earlier ones, so a
  coefficient moves its trait without also pushing along the traits listed before it. Its norm is what is left
  after the projection (not rescaled); a vector (nearly) inside the span of the earlier ones is an error.

``relative=True`` reads ``c_i`` as a fraction of the typical residual norm at ``L`` (recorded at extraction), as
in ``build_ops``: ``c_i * norm_L / |v_i(L)|`` scales the component (for ``orthogonal`` the original ``|v_i(L)|``).

``compose`` returns one ``add`` ``SteerOp`` per layer (the summed ``delta_L``, coefficient 1), so the result is
one table row per layer whatever the number of components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.checks import check_number
from steerlib.core.loading import load_vectors, pick_layer, resolve_vector
from steerlib.core.vectors import TraitVectors, VectorSource
from steerlib.steering.steer import Positions, SteerOp

__all__ = ["COMPOSE_METHODS", "Component", "compose", "layer_deltas"]

COMPOSE_METHODS = ("sum", "orthogonal")
ComposeMethod = Literal["sum", "orthogonal"]
# |w_i| / |v_i| below this: v_i lies (numerically) in the span of the earlier vectors.
_SPAN_TOL = 1e-4


@dataclass(frozen=True)
class Component:
    """One vector of a composition.

    Attributes:
        vectors: trait vectors (anything ``load_vectors`` accepts).
        coef: its coefficient.
        layers: the layers it steers (default: the vectors' recommended layer).
        relative: ``coef`` is a fraction of the typical residual norm at each layer.
        name: how errors name it (default: the trait, or its position).
    """

    vectors: VectorSource
    coef: float
    layers: int | Sequence[int] | None = None
    relative: bool = False
    name: str | None = None


def layer_deltas(model: nn.Module, components: Sequence[Component], *, method: ComposeMethod = "sum",
                 kind: str | None = None) -> dict[int, Tensor]:
    """The added vector per layer, ``{layer: delta_L [d_model] fp32}`` (see the module docstring).

    Args:
        model: the model (for layer checks and widths).
        components: the vectors, in the Gram-Schmidt order.
        method: ``"sum"`` or ``"orthogonal"``.
        kind: pooling kind of TraitVectors.

    Returns:
        Layer -> added vector, for every layer some component names, ascending.
    """
    if method not in COMPOSE_METHODS:
        raise ValueError(f"unknown composition {method!r}; choose from {COMPOSE_METHODS}")
    if not components:
        raise ValueError("no components to compose")
    layout = get_layout(model)
    per_layer: dict[int, list[tuple[str, Tensor, float]]] = {}
    for i, comp in enumerate(components):
        source = load_vectors(comp.vectors, model)
        name = comp.name or (source.trait if isinstance(source, TraitVectors) else f"component {i}")
        coef = check_number(comp.coef, f"coefficient of {name}")
        if comp.layers is None:
            layers = [pick_layer(source, None)]
        else:
            layers = [comp.layers] if isinstance(comp.layers, int) else list(comp.layers)
        if not layers:
            raise ValueError(f"{name}: layers is empty")
        for layer in layers:
            layer = layout.check_layer(layer, allow_embeddings=False)
            vec = resolve_vector(source, layer, kind=kind, d_model=layout.d_model).float()
            scale = coef
            if comp.relative:
                norm = source.layer_norm(layer) if isinstance(source, TraitVectors) else None
                if norm is None:
                    raise ValueError(f"{name}: relative coefficients need vectors that record the typical "
                                     "residual norm (TraitVectors extracted by steerlib)")
                scale = coef * float(norm) / float(vec.norm())
            if any(existing == name for existing, _, _ in per_layer.get(layer, [])):
                raise ValueError(f"{name} is listed twice at layer {layer}")
            per_layer.setdefault(layer, []).append((name, vec, scale))
    deltas = {}
    for layer in sorted(per_layer):
        entries = per_layer[layer]
        if method == "orthogonal":
            entries = _gram_schmidt(entries, layer)
        delta = torch.zeros(layout.d_model, dtype=torch.float32, device=entries[0][1].device)
        for _, vec, scale in entries:
            delta = delta + scale * vec
        deltas[layer] = delta
    return deltas


def _gram_schmidt(entries: list[tuple[str, Tensor, float]], layer: int) -> list[tuple[str, Tensor, float]]:
    """Each vector minus its components along the earlier ones (modified Gram-Schmidt, in float64)."""
    basis: list[Tensor] = []
    out = []
    for name, vec, scale in entries:
        w = vec.double()
        for e in basis:
            w = w - (w @ e) * e
        if float(w.norm()) <= _SPAN_TOL * float(vec.norm()):
            raise ValueError(f"{name} at layer {layer} lies in the span of the vectors before it; nothing is left "
                             "after making it orthogonal to them")
        basis.append(w / w.norm())
        out.append((name, w.float(), scale))
    return out


def compose(model: nn.Module, components: Sequence[Component], *, method: ComposeMethod = "sum",
            positions: Positions = "all", kind: str | None = None) -> list[SteerOp]:
    """Steering ops for several vectors at once: one ``add`` op per layer carrying the combined vector.

    Args:
        model: the model.
        components: the vectors with their coefficients and layers, in the Gram-Schmidt order.
        method: ``"sum"`` (plain sum) or ``"orthogonal"`` (Gram-Schmidt in the given order, per layer).
        positions: which tokens the edits touch.
        kind: pooling kind of TraitVectors.

    Returns:
        ``SteerOp`` s for ``generate(steering=...)`` or ``ResidualEditor``.

    Example:
        >>> ops = compose(model, [Component(optimistic, 4.0, [16]), Component(humorous, 2.0, [16, 18])],
        ...               method="orthogonal")
    """
    # A layer whose coefficients are all zero adds nothing and gets no op.
    return [SteerOp(layer=layer, vector=delta, mode="add", coef=1.0, positions=positions)
            for layer, delta in layer_deltas(model, components, method=method, kind=kind).items()
            if bool(delta.any())]
