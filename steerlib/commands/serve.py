"""``steerlib serve``: what the server was given, checked before the model loads and the port binds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlib.core.checks import check_choice, check_int, check_number
from steerlib.core.loading import load_vectors
from steerlib.core.models import resolve_model_path
from steerlib.core.vectors import TraitVectors
from steerlib.steering.steer import MODES, POSITIONS

__all__ = ["check_serve"]


def check_serve(
    model_path: str | Path | None,
    vectors: dict[str, str],
    *,
    steer: Sequence[tuple[int, float]] = (),
    steer_mode: str = "add",
    steer_positions: str = "all",
    monitor_layer: int | None = None,
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 256,
    max_tokens_limit: int = 512,
    default_max_tokens: int = 128,
    presets: Sequence[tuple[str, Sequence[Any]]] = (),
) -> None:
    """Check what ``steerlib serve`` was given before the model loads and the server binds its port.

    Reads only the model's config (for its depth) and the vector files: a layer the model does not have, a
    coefficient that is not a finite number or a port outside 1..65535 fails here with one line.
    """
    check_int(port, "--port", minimum=1, maximum=65535)
    for value, what in ((max_batch, "--max-batch"), (max_queue, "--max-queue"),
                        (max_tokens_limit, "--max-tokens-limit"), (default_max_tokens, "--default-max-tokens")):
        check_int(value, what)
    if default_max_tokens > max_tokens_limit:
        raise ValueError(f"--default-max-tokens {default_max_tokens} exceeds --max-tokens-limit {max_tokens_limit}")
    check_choice(steer_mode, "steering mode", MODES)
    check_choice(steer_positions, "positions", POSITIONS)
    if not vectors:
        raise ValueError("no trait vectors given (--vector)")
    folder, _ = resolve_model_path(model_path)
    from transformers import AutoConfig  # config only: no weights are read

    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    for layer, c in steer:
        check_number(c, f"--steer coefficient at layer {layer}")
        if n_layers is not None:
            check_int(layer, "--steer layer", maximum=n_layers)
    if monitor_layer is not None and n_layers is not None:
        check_int(monitor_layer, "--monitor-layer", maximum=n_layers)
    for name, specs in presets:
        for spec in specs:
            if spec.vector not in vectors:
                raise ValueError(f"--preset {name}: no vector named {spec.vector!r} (given: {sorted(vectors)})")
            if n_layers is not None:
                check_int(spec.layer, f"--preset {name} layer", maximum=n_layers)
    for name, path in vectors.items():
        source = load_vectors(path)
        if isinstance(source, TraitVectors) and n_layers is not None and source.n_positions != n_layers + 1:
            raise ValueError(f"{path}: vectors {name!r} cover {source.n_positions - 1} blocks but the model has "
                             f"{n_layers}")
