"""``steerlib`` command line: a thin shell over the Python API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Persona vectors: extract, steer, monitor, flag.")
traits_app = typer.Typer(no_args_is_help=True, help="List, show and create trait definitions.")
app.add_typer(traits_app, name="traits")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF folder or .gguf; default: embedded SmolLM2")]


def _load(model: str | None, dtype: str = "float32"):
    from .models import load_model

    return load_model(model, dtype=dtype)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.command()
def extract(
    trait: Annotated[str, typer.Option(help="built-in trait name or trait JSON file")],
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/<trait>)")] = None,
    model: ModelOpt = None,
    judge: Annotated[str, typer.Option(help="auto | lexicon[:polarity] | self | openai:<model>")] = "auto",
    n_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 48,
    pos_threshold: float = 50.0,
    neg_threshold: float = 50.0,
    coherence_threshold: Annotated[float | None, typer.Option(help="also judge coherence and keep >= this")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="use only the first N instruction pairs")] = None,
    max_questions: Annotated[int | None, typer.Option(help="use only the first N questions of each split")] = None,
    batch_size: int = 16,
    backend: Annotated[str, typer.Option(help="torch | transformer_lens | nnsight")] = "torch",
) -> None:
    """Generate contrastive responses, judge, filter, and extract per-layer trait vectors (resumable)."""
    from .extract import ExtractionConfig, extract_trait
    from .judges import make_judge
    from .traits import load_trait

    t = load_trait(trait)
    loaded = _load(model)
    m, tok = loaded
    cfg = ExtractionConfig(n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                           pos_threshold=pos_threshold, neg_threshold=neg_threshold,
                           coherence_threshold=coherence_threshold, max_pairs=max_pairs,
                           max_questions=max_questions, batch_size=batch_size, backend=backend)
    j = make_judge(judge, t, model=m, tokenizer=tok)
    coherence = None
    if coherence_threshold is not None:
        coherence = make_judge(judge if judge.startswith("openai:") else "self", t, model=m, tokenizer=tok,
                               rubric=t.coherence_rubric)
    result = extract_trait(m, tok, t, out or Path("runs") / t.name, judge=j, coherence_judge=coherence, config=cfg,
                           model_name=loaded.name)
    typer.echo(result.sweep.table())


@app.command()
def steer(
    vector: Annotated[Path, typer.Option(help="trait vectors folder/.safetensors, or a .pt tensor")],
    prompt: Annotated[list[str], typer.Option(help="user message (repeatable)")],
    layer: Annotated[int | None, typer.Option(help="layer to steer (default: the vectors' recommended layer)")] = None,
    coef: float = 4.0,
    mode: Annotated[str, typer.Option(help="add | ablate | cap")] = "add",
    positions: Annotated[str, typer.Option(help="all | prompt | response")] = "all",
    relative: Annotated[bool, typer.Option(help="coef as a fraction of the typical residual norm")] = False,
    cap_min: float | None = None,
    cap_max: float | None = None,
    sweep: Annotated[str | None, typer.Option(help="comma-separated coefficients: dose-response table + plot")] = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    plot: Annotated[Path | None, typer.Option(help="dose-response PNG (with --sweep)")] = None,
    model: ModelOpt = None,
) -> None:
    """Print the steered answer next to the unsteered one (or a coefficient sweep)."""
    from .chat import format_prompt
    from .dose import dose_response
    from .generation import generate
    from .steer import build_monitor, build_ops
    from .vectors import TraitVectors

    m, tok = _load(model)
    source = TraitVectors.load(vector, model=m) if vector.suffix != ".pt" else vector
    if layer is None:
        if not isinstance(source, TraitVectors) or source.recommended_layer is None:
            raise typer.BadParameter("--layer is required for vectors without a recommended layer")
        layer = source.recommended_layer
    prompts = [format_prompt(tok, p, system) for p in prompt]
    trait = source.trait if isinstance(source, TraitVectors) else "trait"
    monitor = build_monitor(m, {trait: source}, [layer])
    coefs = _floats(sweep) if sweep else [0.0, coef]
    cap = (cap_min, cap_max) if mode == "cap" else None
    if sweep:
        table = dose_response(m, tok, prompts, source, layer, coefs, relative=relative, monitor=monitor,
                              max_new_tokens=max_new_tokens, judge=_sweep_judge(trait), plot_path=plot)
        typer.echo(table.format())
        return
    for c in coefs:
        ops = [] if c == 0 and mode == "add" else build_ops(m, source, layer, c, mode=mode, positions=positions,
                                                           cap=cap, relative=relative)
        outs = generate(m, tok, prompts, steering=ops, monitor=monitor, max_new_tokens=max_new_tokens)
        label = "unsteered" if not ops else f"{mode} coef={c:g} layer={layer}"
        for p, g in zip(prompt, outs, strict=True):
            typer.echo(f"--- {label} | {p}\n{g.text}\n(mean projection {g.mean_projection():.2f})")


def _sweep_judge(trait: str):
    """The offline judge for a dose-response, where the trait has one."""
    from .judges import make_judge
    from .traits import TraitError, load_trait

    try:
        return make_judge("auto", load_trait(trait))
    except (TraitError, ValueError):
        return None


@traits_app.command("list")
def traits_list() -> None:
    """List built-in traits."""
    from .traits import list_traits, load_trait

    for name in list_traits():
        typer.echo(f"{name:18s} {load_trait(name).description[:90]}")


@traits_app.command("show")
def traits_show(name: str) -> None:
    """Print a trait definition as JSON."""
    from .traits import load_trait

    typer.echo(json.dumps(load_trait(name).to_dict(), indent=2))


@traits_app.command("new")
def traits_new(
    name: str,
    description: Annotated[str, typer.Option(help="plain-language description of the trait")],
    out: Annotated[Path | None, typer.Option(help="where to save (default traits/<name>.json)")] = None,
    base_url: Annotated[str | None, typer.Option(envvar="OPENAI_BASE_URL")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    llm: Annotated[str, typer.Option("--llm", help="chat model name at the endpoint")] = "gpt-4o-mini",
) -> None:
    """Write a new trait file from a description, via any OpenAI-compatible chat endpoint."""
    from .trait_gen import generate_trait

    base_url = base_url or os.environ.get("STEERLIB_JUDGE_BASE_URL")
    if not base_url:
        raise typer.BadParameter("no endpoint: pass --base-url or set OPENAI_BASE_URL")
    trait = generate_trait(name, description, base_url=base_url, model=llm, api_key=api_key)
    path = trait.save(out or Path("traits") / f"{trait.name}.json")
    typer.echo(f"wrote {path}: {len(trait.instruction_pairs)} pairs, {len(trait.extraction_questions)} extraction "
               f"and {len(trait.eval_questions)} evaluation questions")


def main() -> None:
    """Entry point: bad input ends with one clear line, not a traceback."""
    from .judges import JudgeError

    try:
        app()
    except (ValueError, FileNotFoundError, NotImplementedError, JudgeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
