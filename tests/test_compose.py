"""Composition of several steering vectors (``steerlib.steering.compose``): the plain sum and the Gram-Schmidt
variant equal a manual computation, per layer, and steer a model exactly like a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from steerlib.core.vectors import TraitVectors
from steerlib.steering.compose import Component, compose, layer_deltas
from steerlib.steering.steer import ResidualEditor

D = 64


def _tables(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, D, generator=g) for _ in range(3)]  # tiny llama: 3 blocks -> layers 0..3


def _components(tables: list[torch.Tensor]) -> list[Component]:
    a, b, c = tables
    return [Component(a, 2.0, [1, 2], name="a"), Component(b, -1.5, 2, name="b"), Component(c, 0.5, [2, 3], name="c")]


def test_sum_equals_manual(make_tiny) -> None:
    model = make_tiny("llama")
    a, b, c = tables = _tables()
    deltas = layer_deltas(model, _components(tables), method="sum")
    assert sorted(deltas) == [1, 2, 3]
    torch.testing.assert_close(deltas[1], 2.0 * a[1])
    torch.testing.assert_close(deltas[2], 2.0 * a[2] - 1.5 * b[2] + 0.5 * c[2])
    torch.testing.assert_close(deltas[3], 0.5 * c[3])


def test_orthogonal_equals_manual_gram_schmidt(make_tiny) -> None:
    model = make_tiny("llama")
    a, b, c = tables = _tables(1)
    deltas = layer_deltas(model, _components(tables), method="orthogonal")
    # layer 2 holds a, b, c in that order: b loses its part along a, c its parts along a and b's remainder
    va, vb, vc = (t[2].double() for t in (a, b, c))
    ea = va / va.norm()
    wb = vb - (vb @ ea) * ea
    eb = wb / wb.norm()
    wc = vc - (vc @ ea) * ea - (vc @ eb) * eb
    torch.testing.assert_close(deltas[2], (2.0 * va - 1.5 * wb + 0.5 * wc).float(), atol=1e-5, rtol=1e-5)
    assert abs(float(wb @ va)) < 1e-9 and abs(float(wc @ vb)) < 1e-9
    # a layer with one component is that component alone
    torch.testing.assert_close(deltas[1], 2.0 * a[1])
    torch.testing.assert_close(deltas[3], 0.5 * c[3])
    # the order is the stated one: listing b first changes the result
    swapped = layer_deltas(model, [_components(tables)[i] for i in (1, 0, 2)], method="orthogonal")
    assert not torch.allclose(swapped[2], deltas[2], atol=1e-3)


@pytest.mark.parametrize("method", ["sum", "orthogonal"])
def test_composed_ops_steer_like_a_hand_written_hook(make_tiny, method: str) -> None:
    model = make_tiny("llama")
    tables = _tables(2)
    deltas = layer_deltas(model, _components(tables), method=method)  # type: ignore[arg-type]
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with ResidualEditor(model, compose(model, _components(tables), method=method)):  # type: ignore[arg-type]
        steered = model(ids).logits

    def adder(delta: torch.Tensor):
        def hook(_m, _a, out):
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta
        return hook

    handles = [model.model.layers[layer - 1].register_forward_hook(adder(d)) for layer, d in deltas.items()]
    try:
        manual = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(steered, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, model(ids).logits, atol=1e-3)


def test_relative_coefficients_and_errors(make_tiny) -> None:
    model = make_tiny("llama")
    a, b, _ = _tables(3)
    tv = TraitVectors({"response_mean": a}, "tiny", "a", metadata={"residual_norms": [1.0, 10.0, 20.0, 30.0]})
    deltas = layer_deltas(model, [Component(tv, 0.5, 2, relative=True)])
    torch.testing.assert_close(deltas[2].norm(), torch.tensor(10.0))
    with pytest.raises(ValueError, match="b at layer 2 lies in the span of the vectors before it"):
        layer_deltas(model, [Component(a, 1.0, 2, name="a"), Component(a * 3, 1.0, 2, name="b")],
                     method="orthogonal")
    with pytest.raises(ValueError, match="unknown composition 'mean'"):
        layer_deltas(model, [Component(a, 1.0, 2)], method="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relative coefficients need vectors that record"):
        layer_deltas(model, [Component(b, 1.0, 2, relative=True, name="b")])
