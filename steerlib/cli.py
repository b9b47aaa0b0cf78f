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


@app.command()
def flag(
    vector: Annotated[Path, typer.Option(help="trait vectors folder/.safetensors")],
    data: Annotated[Path, typer.Option(help="JSONL (chat messages or prompt/response) or CSV")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/flag"),
    layer: Annotated[int | None, typer.Option(help="default: the vectors' recommended layer")] = None,
    baseline: Annotated[str, typer.Option(help="none | generate (paper's projection difference) | prompt_last")] = "none",
    top_k: int = 20,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    on_error: Annotated[str, typer.Option(help="raise | skip malformed lines (always reported)")] = "raise",
    fresh: Annotated[bool, typer.Option(help="ignore earlier partial results")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="score with a Ray Data pipeline")] = False,
    ray_concurrency: int = 1,
    ray_address: str | None = None,
    model: ModelOpt = None,
) -> None:
    """Score finetuning data by projection on a trait vector; rank, flag the top k, plot a histogram."""
    from .flag import flag_file

    report = flag_file(data, vector, out_dir=out, model_path=model, layer=layer, baseline=baseline,  # type: ignore[arg-type]
                       batch_size=batch_size, max_new_tokens=max_new_tokens, top_k=top_k, resume=not fresh,
                       on_error=on_error, use_ray=ray, ray_concurrency=ray_concurrency,  # type: ignore[arg-type]
                       ray_address=ray_address)
    typer.echo(json.dumps(report.summary, indent=2))
    for i, row in enumerate(report.top[:top_k], start=1):
        typer.echo(f"{i:3d}. {json.dumps(row)[:160]}")


@app.command()
def shift(
    finetuned: Annotated[Path, typer.Option(help="finetuned model folder or LoRA adapter folder")],
    vector: Annotated[Path, typer.Option(help="trait vectors folder/.safetensors")],
    base: Annotated[str | None, typer.Option(help="base model (default: embedded)")] = None,
    out: Path = Path("runs/shift"),
    trait: Annotated[str | None, typer.Option(help="trait whose eval questions to use (default: the vectors')")] = None,
    questions: Annotated[Path | None, typer.Option(help="file of questions, one per line")] = None,
    layers: Annotated[str | None, typer.Option(help="comma-separated layers (default: all)")] = None,
    max_new_tokens: int = 48,
) -> None:
    """Finetuning shift: activation difference finetuned - base, projected on the trait vector, per layer."""
    from .shift import shift_file

    result = shift_file(finetuned, vector, out_dir=out, base_path=base, trait=trait, questions_path=questions,
                        layers=_ints(layers) if layers else None, max_new_tokens=max_new_tokens)
    typer.echo("layer  prompt_last  response_mean")
    for i, layer in enumerate(result.layers):
        typer.echo(f"{layer:5d}  {result.prompt_last[i]:11.3f}  {result.response_mean[i]:13.3f}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="JSONL/CSV finetuning data")],
    out: Path = Path("runs/lora"),
    vector: Annotated[Path | None, typer.Option(help="trait vectors for preventative steering")] = None,
    layer: int | None = None,
    coef: Annotated[float, typer.Option(help="preventative steering coefficient (0 = plain finetune)")] = 0.0,
    mode: Annotated[str, typer.Option(help="add (preventative steering) | ablate (CAFT-style)")] = "add",
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank")] = 8,
    seed: int = 0,
    model: ModelOpt = None,
) -> None:
    """LoRA-finetune, optionally steering along (or ablating) a trait vector during training."""
    from .training import train_file

    result = train_file(data, out_dir=out, model_path=model, vectors_path=vector, layer=layer, coef=coef,
                        mode=mode, steps=steps, batch_size=batch_size, lr=lr, r=rank, seed=seed)  # type: ignore[arg-type]
    typer.echo(f"trained {len(result.losses)} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
               f"adapter in {out}")


@app.command()
def monitor(
    vector: Annotated[list[str], typer.Option(help="trait vectors path, or name=path (repeatable)")],
    conversations: Annotated[Path, typer.Option(help="JSONL logs: chat messages, optional timestamp")],
    out: Path = Path("runs/monitor"),
    layer: int | None = None,
    window: int = 20,
    method: Annotated[str, typer.Option(help="zscore | percentile | rolling")] = "zscore",
    threshold: float = 3.0,
    reference_size: int = 50,
    on_error: str = "raise",
    fresh: bool = False,
    model: ModelOpt = None,
) -> None:
    """Score a deployed assistant's responses over time: projections, rolling mean, alerts, timeline plot."""
    from .drift import monitor_file

    report = monitor_file(conversations, vector, out_dir=out, model_path=model, layer=layer, window=window,
                          method=method, threshold=threshold, reference_size=reference_size, resume=not fresh,
                          on_error=on_error)  # type: ignore[arg-type]
    typer.echo(f"{report.n_turns} responses scored ({report.computed} new), {len(report.alerts)} alerts")
    typer.echo(f"scores {report.scores_path}\nalerts {report.alerts_path}\nplot   {report.plot_path}")


def _named_paths(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        out[name] = path
    return out


def _layer_coefs(items: list[str]) -> list[tuple[int, float]]:
    out = []
    for item in items:
        layer, sep, coef = item.partition(":")
        try:
            out.append((int(layer), float(coef)))
        except ValueError:
            raise typer.BadParameter(f"--steer expects LAYER:COEF, got {item!r}") from None
        if not sep:
            raise typer.BadParameter(f"--steer expects LAYER:COEF, got {item!r}")
    return out


@app.command()
def serve(
    vector: Annotated[list[str], typer.Option(help="trait vectors, name=path or path (repeatable)")],
    steer: Annotated[list[str] | None, typer.Option("--steer", help="default steering LAYER:COEF (repeatable)")] = None,
    steer_vector: Annotated[str | None, typer.Option(help="which named vector --steer uses")] = None,
    steer_mode: str = "add",
    steer_positions: str = "all",
    monitor: Annotated[list[str] | None, typer.Option("--monitor", help="traits to monitor (default: all)")] = None,
    monitor_layer: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 256,
    max_tokens_limit: int = 512,
    default_max_tokens: int = 128,
    api_key: Annotated[str | None, typer.Option(help="require this bearer token on every route but /health "
                                                     "(or set STEERLIB_API_KEY)")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="allowed CORS origin (repeatable)")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="Host header values to accept (default: the bound host; '*' = any)")] = None,
    vector_dir: Annotated[list[Path] | None, typer.Option(
        "--vector-dir", help="folder POST /v1/vectors may load from (repeatable; default: none)")] = None,
    max_body_bytes: int = 1_000_000,
    drift_window: int = 20,
    drift_method: str = "zscore",
    drift_threshold: float = 3.0,
    drift_reference_size: int = 50,
    drift_include_steered: bool = False,
    alerts_path: Path | None = None,
    dtype: str = "float32",
    model: ModelOpt = None,
) -> None:
    """OpenAI- and Ollama-compatible chat server: continuous batching with per-request steering, per-token
    trait projections and drift alerts."""
    from .serve import AppOptions, ServeOptions
    from .serve import serve as run_server

    try:
        app_options = AppOptions(
            monitor_traits=tuple(monitor) if monitor else None, monitor_layer=monitor_layer, max_batch=max_batch,
            max_queue=max_queue, max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens,
            api_key=api_key, cors_origins=tuple(cors_origin or ()), host=host,
            allowed_hosts=tuple(allowed_host) if allowed_host else None, max_body_bytes=max_body_bytes,
            vector_dirs=tuple(vector_dir or ()), drift_include_steered=drift_include_steered)
        options = ServeOptions(model_path=model, vectors=_named_paths(vector), steer=tuple(_layer_coefs(steer or [])),
                               steer_vector=steer_vector, steer_mode=steer_mode, steer_positions=steer_positions,
                               app=app_options, port=port, drift_window=drift_window, drift_method=drift_method,
                               drift_threshold=drift_threshold, drift_reference_size=drift_reference_size,
                               alerts_path=alerts_path, dtype=dtype)
        options.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        run_server(options)
    except ValueError as exc:  # found once the model is loaded: a layer it does not have, a vector of another model
        raise typer.BadParameter(str(exc)) from None


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
