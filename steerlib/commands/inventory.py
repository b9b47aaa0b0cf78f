"""``steerlib inventory``: a judge-free Likert inventory, or the steering-effect matrix."""

from __future__ import annotations

import contextlib
from pathlib import Path

from steerlib.commands.common import fit_vectors
from steerlib.core import models
from steerlib.core.checks import check_number, check_out_dir
from steerlib.core.loading import load_vectors
from steerlib.evaluation.inventory import (
    Inventory,
    InventoryMatrix,
    InventoryResult,
    administer,
    inventory_matrix,
)
from steerlib.store.results import exclusive_output

__all__ = ["inventory_file"]


def inventory_file(
    vectors: dict[str, str] | None = None,
    *,
    model_path: str | Path | None = None,
    inventory: str = "big_five",
    coef: float = 0.5,
    relative: bool = True,
    layer: int | None = None,
    out: str | Path | None = None,
) -> InventoryResult | InventoryMatrix:
    """Administer an inventory; with named vectors, the steering-effect matrix (saved to ``out`` if given)."""
    items = Inventory.load(inventory)  # the files and numbers first: nothing loads a model before they pass
    check_number(coef, "coef")
    if out is not None:
        check_out_dir(Path(out).parent)
    loaded = {name: load_vectors(path) for name, path in (vectors or {}).items()}
    # The lock is the output file's own (a run folder also holds other jobs' outputs).
    lock = (contextlib.nullcontext() if out is None or not loaded else
            exclusive_output(Path(out).parent, "steerlib inventory", lock_name=f".{Path(out).name}.lock"))
    with lock:
        model, tok = models.load_model(model_path)
        if not loaded:
            return administer(model, tok, items)
        loaded = {name: fit_vectors(v, vectors[name], model) for name, v in loaded.items()}
        matrix = inventory_matrix(model, tok, loaded, inventory=items, coef=coef, relative=relative, layer=layer)
        if out is not None:
            matrix.save(out)
        return matrix
