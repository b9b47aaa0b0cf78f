"""``steerlib traits new``: a trait file written from a description by a chat endpoint."""

from __future__ import annotations

from pathlib import Path

from steerlib.core.checks import check_out_dir
from steerlib.traits.library import Trait, check_trait_name

__all__ = ["new_trait_file"]


def new_trait_file(
    name: str,
    description: str,
    *,
    out: str | Path | None = None,
    base_url: str | None,
    model: str = "gpt-4o-mini",
    api_key: str | None = None,
    folder: str | Path = "traits",
) -> tuple[Trait, Path]:
    """Generate a trait from a description at an OpenAI-compatible endpoint and save it.

    The name is checked before the endpoint is called: it becomes ``<folder>/<name>.json`` and must not
    reach outside ``folder`` (no separators, no ``..``).

    Args:
        name: trait name (letters, digits, ``_``, ``-``).
        description: plain-language description.
        out: file to write (default ``<folder>/<name>.json``).
        base_url: the endpoint.
        model: chat model name at the endpoint.
        api_key: the endpoint's key, if it needs one.
        folder: where traits are kept.
    """
    from steerlib.traits.generate import generate_trait

    check_trait_name(name)
    if not description.strip():
        raise ValueError("the trait description is empty")
    path = Path(out) if out is not None else Path(folder) / f"{name}.json"
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name the trait file to write")
    check_out_dir(path.parent, "trait folder")
    if not base_url:
        raise ValueError("no endpoint: pass --base-url or set OPENAI_BASE_URL")
    trait = generate_trait(name, description, base_url=base_url, model=model, api_key=api_key)
    return trait, trait.save(path)
