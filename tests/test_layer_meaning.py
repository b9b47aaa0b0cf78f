"""One meaning of "layer L" for capture, steering and read-out (defined in steerlib.core.hooks).

At every layer 0..n, the top one included, a vector captured there and added back there moves exactly the tensor it
was read from: steering at ``L`` shifts the recording at ``L`` by ``coef * v`` and leaves the layers below alone,
and a read-out at ``L`` is the projection of that recording.
"""

from __future__ import annotations

import pytest
import torch
from helpers import residual_states

from steerlib.core.arch import get_layout
from steerlib.core.hooks import record_residual, residual_site
from steerlib.steering.steer import build_readout, read_out, steer

COEF = 0.75


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(4))


def _record_all(model, ids) -> dict[int, torch.Tensor]:
    with torch.no_grad(), record_residual(model) as records:
        model(ids)
    return {layer: recs[0] for layer, recs in records.items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_captured_vector_added_back_moves_its_own_tensor(make_tiny, model_type: str) -> None:
    model = make_tiny(model_type)
    layout = get_layout(model)
    ids = _ids()
    before = _record_all(model, ids)
    assert sorted(before) == list(range(layout.n_layers + 1))
    for layer in range(1, layout.n_layers + 1):
        # The vector is read from the captured tensor itself (a mean over tokens), then steered in at its layer.
        vec = before[layer].mean(dim=(0, 1))
        with steer(model, vec, layers=layer, coef=COEF):
            after = _record_all(model, ids)
        for lower in range(layer):
            torch.testing.assert_close(after[lower], before[lower], rtol=0, atol=0)
        torch.testing.assert_close(after[layer], before[layer] + COEF * vec, rtol=1e-5, atol=1e-5)


def test_top_layer_is_before_the_final_norm(make_tiny) -> None:
    """The top layer is the last block's raw output; transformers' last hidden state is its normed form."""
    model = make_tiny("llama")
    layout = get_layout(model)
    n = layout.n_layers
    ids = _ids()
    recorded = _record_all(model, ids)
    reference = residual_states(model, ids)
    torch.testing.assert_close(recorded[n], reference[n], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        normed = model(ids, output_hidden_states=True).hidden_states[n]
        torch.testing.assert_close(layout.final_norm(recorded[n]), normed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(recorded[n], normed, atol=1e-2)
    assert residual_site(layout, n) == (layout.blocks[n - 1], False)
    assert residual_site(layout, 0) == (layout.blocks[0], True)
    assert residual_site(layout, -1) == (layout.blocks[n - 1], False)


def test_readout_at_every_layer_projects_the_captured_tensor(make_tiny) -> None:
    """The steering path's read-out at layer L equals the projection of what capture records at L."""
    model = make_tiny("llama")
    layout = get_layout(model)
    ids = _ids()
    recorded = _record_all(model, ids)
    direction = torch.randn(layout.d_model, generator=torch.Generator().manual_seed(9))
    unit = direction / direction.norm()
    readout = build_readout(model, {"t": direction}, list(range(1, layout.n_layers + 1)))
    with torch.no_grad(), read_out(model, readout):
        model(ids)
    for layer in range(1, layout.n_layers + 1):
        torch.testing.assert_close(readout.stacked(layer)[..., 0], recorded[layer] @ unit, rtol=1e-5, atol=1e-5)
