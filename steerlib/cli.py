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


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _layer_list(text: str) -> list[int]:
    """Layers as ``16-22`` (inclusive range) or ``16,18,20``."""
    if "-" in text.strip().lstrip("-"):
        first, _, last = text.partition("-")
        try:
            a, b = int(first), int(last)
        except ValueError:
            raise ValueError(f"expected layers as A-B or A,B,C, got {text!r}") from None
        if b < a:
            raise ValueError(f"layer range {text!r} is empty (the end is before the start)")
        return list(range(a, b + 1))
    return _ints(text)


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
    engine: Annotated[str, typer.Option(help="hf | vllm: what generates the contrastive responses (vllm: one "
                                             "submission, activations pooled inside vLLM)")] = "hf",
    vllm_arg: Annotated[list[str] | None, typer.Option(
        "--vllm-arg", help="with --engine vllm: a vLLM engine argument, NAME=VALUE (e.g. tensor_parallel_size=3; "
                           "repeatable)")] = None,
) -> None:
    """Generate contrastive responses, judge, filter, and extract per-layer trait vectors (resumable)."""
    from steerlib.commands.extract import extract_file
    from steerlib.extraction.extract import ExtractionConfig

    cfg = ExtractionConfig(n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                           pos_threshold=pos_threshold, neg_threshold=neg_threshold,
                           coherence_threshold=coherence_threshold, max_pairs=max_pairs,
                           max_questions=max_questions, batch_size=batch_size, backend=backend)
    result = extract_file(trait, out, model_path=model, judge=judge, config=cfg, engine=engine,
                          vllm_args=_vllm_args(vllm_arg or []))
    typer.echo(result.sweep.table())


@app.command()
def steer(
    vector: Annotated[Path, typer.Option(help="trait vectors folder/.safetensors, or a .pt tensor")],
    prompt: Annotated[list[str], typer.Option(help="user message (repeatable)")],
    layer: Annotated[int | None, typer.Option(help="layer to steer (default: the vectors' recommended layer)")] = None,
    coef: float = 4.0,
    mode: Annotated[str, typer.Option(help="a registered steering method: add | ablate | cap | ...")] = "add",
    positions: Annotated[str, typer.Option(
        help="a position rule: all | prompt | response | first:N | window:A-B | marker:TEXT | ...")] = "all",
    param: Annotated[list[str] | None, typer.Option(
        help="a parameter of the method, NAME=VALUE (repeatable; --coef sets its strength)")] = None,
    relative: Annotated[bool, typer.Option(help="coef as a fraction of the typical residual norm")] = False,
    cap_min: float | None = None,
    cap_max: float | None = None,
    sweep: Annotated[str | None, typer.Option(help="comma-separated coefficients: dose-response table + plot")] = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    plot: Annotated[Path | None, typer.Option(help="dose-response PNG (with --sweep)")] = None,
    cap_percentile: Annotated[float | None, typer.Option(
        help="cap the projection at this percentile of the calibration (steerlib calibrate)")] = None,
    cap_side: Annotated[str, typer.Option(help="max (cap from above) | min (floor) for --cap-percentile")] = "max",
    layers: Annotated[str | None, typer.Option(help="layers for --cap-percentile: A-B or A,B,C")] = None,
    when_above: Annotated[float | None, typer.Option(
        help="steer only tokens whose projection on --when-vector (at the steered layer) is >= this")] = None,
    when_below: Annotated[float | None, typer.Option(help="steer only tokens whose projection is <= this")] = None,
    when_vector: Annotated[Path | None, typer.Option(help="condition vectors (default: --vector)")] = None,
    latch: Annotated[bool, typer.Option(help="once the condition holds, steer the rest of the answer")] = False,
    capability_items: Annotated[int, typer.Option(
        help="with --sweep: capability items of each kind scored per coefficient (0: no capability column)")] = 4,
    model: ModelOpt = None,
) -> None:
    """Print the steered answer next to the unsteered one (or a coefficient sweep).

    --positions takes all | prompt | response | first:N | window:A-B | marker:TEXT."""
    from steerlib.commands.steer import steer_file

    result = steer_file(vector, prompt, model_path=model, layer=layer, coef=coef, mode=mode, positions=positions,
                        relative=relative, cap=(cap_min, cap_max) if cap_min is not None or cap_max is not None else None,
                        params=param or (),
                        sweep=_floats(sweep) if sweep is not None else None, system=system, max_new_tokens=max_new_tokens,
                        plot=plot, cap_percentile=cap_percentile, cap_side=cap_side,
                        layers=_layer_list(layers) if layers is not None else None, when_vector=when_vector,
                        when_above=when_above, when_below=when_below, latch=latch, capability_items=capability_items)
    if result.dose is not None:
        typer.echo(result.dose.format())
        return
    for c, outs in result.answers.items():
        label = result.labels.get(c) or ("unsteered" if c == 0 else f"{mode} coef={c:g} layer={result.layer}")
        for p, g in zip(prompt, outs, strict=True):
            typer.echo(f"--- {label} | {p}\n{g.text}\n(mean projection {g.mean_projection():.2f})")


@app.command()
def calibrate(
    vector: Annotated[Path, typer.Option(help="trait vectors folder/.safetensors")],
    layers: Annotated[str | None, typer.Option(help="layers to calibrate: A-B or A,B,C (default: all)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="length of each reference answer")] = 48,
    batch_size: int = 8,
    fresh: Annotated[bool, typer.Option(help="ignore earlier partial results")] = False,
    model: ModelOpt = None,
    engine: Annotated[str, typer.Option(help="hf | vllm: what generates the reference answers (vllm: all in one "
                                             "submission; the projections are captured on the HF model)")] = "hf",
    vllm_arg: Annotated[list[str] | None, typer.Option(
        help="a vLLM engine argument NAME=VALUE (with --engine vllm; repeatable)")] = None,
) -> None:
    """Record per-layer percentiles of the trait's projection on the model's answers to ordinary questions
    (saved beside the vectors as calibration.json; resumable), for caps given as percentiles."""
    from steerlib.commands.calibrate import calibrate_file

    cal, path = calibrate_file(vector, model_path=model, layers=_layer_list(layers) if layers else None,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, fresh=fresh, engine=engine,
                               vllm_args=_vllm_args(vllm_arg or []))
    typer.echo(f"{cal.n_answers} answers, {cal.n_tokens} tokens per layer -> {path}")
    typer.echo("layer     p5    p25    p50    p75    p95")
    for layer in cal.layers:
        typer.echo(f"{layer:5d} " + " ".join(f"{cal.value(layer, p):6.2f}" for p in (5, 25, 50, 75, 95)))


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
    negate: Annotated[bool, typer.Option("--negate", help="rank by the opposite pole (most negative first)")] = False,
    engine: Annotated[str, typer.Option(help="hf | vllm: what computes the activations and generates --baseline "
                                             "generate's responses")] = "hf",
    vllm_arg: Annotated[list[str] | None, typer.Option(
        "--vllm-arg", help="with --engine vllm: a vLLM engine argument, NAME=VALUE (e.g. tensor_parallel_size=3; "
                           "repeatable)")] = None,
    server: Annotated[str | None, typer.Option(
        help="a running `steerlib serve --engine vllm` (URL) computes the activations and baselines; --model names "
             "the served model's folder (its tokenizer and shape)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="STEERLIB_API_KEY", help="the server's API key")] = None,
) -> None:
    """Score finetuning data by projection on a trait vector; rank, flag the top k, plot a histogram."""
    from steerlib.commands.flag import flag_file

    report = flag_file(data, vector, out_dir=out, model_path=model, layer=layer, baseline=baseline,  # type: ignore[arg-type]
                       batch_size=batch_size, max_new_tokens=max_new_tokens, top_k=top_k, resume=not fresh,
                       on_error=on_error, use_ray=ray, ray_concurrency=ray_concurrency,  # type: ignore[arg-type]
                       ray_address=ray_address, negate=negate, engine=engine,
                       vllm_args=_vllm_args(vllm_arg or []), server=server, api_key=api_key)
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
    from steerlib.commands.shift import shift_file

    result = shift_file(finetuned, vector, out_dir=out, base_path=base, trait=trait, questions_path=questions,
                        layers=_ints(layers) if layers is not None else None, max_new_tokens=max_new_tokens)
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
    capability_items: Annotated[int, typer.Option(
        help="with --vector: capability items of each kind scored before and after training (0: off)")] = 4,
    model: ModelOpt = None,
) -> None:
    """LoRA-finetune, optionally steering along (or ablating) a trait vector during training."""
    from steerlib.commands.train import train_file

    result = train_file(data, out_dir=out, model_path=model, vectors_path=vector, layer=layer, coef=coef,
                        mode=mode, steps=steps, batch_size=batch_size, lr=lr, r=rank, seed=seed,  # type: ignore[arg-type]
                        capability_items=capability_items)
    typer.echo(f"trained {len(result.losses)} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
               f"adapter in {out}")
    before, after = getattr(result, "capability_before", None), getattr(result, "capability_after", None)
    if before is not None and after is not None:
        typer.echo(f"before training: {before.format()}\nafter training:  {after.format()}")


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
    from steerlib.commands.monitor import monitor_file

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
            raise ValueError(f"--steer expects LAYER:COEF, got {item!r}") from None
        if not sep:
            raise ValueError(f"--steer expects LAYER:COEF, got {item!r}")
    return out


def _vllm_args(items: list[str], **given: object) -> dict[str, object]:
    """vLLM engine arguments the user gave: the named flags set, then ``--vllm-arg NAME=VALUE`` items."""
    from steerlib.vllm.layout import parse_engine_arg

    out = {name: value for name, value in given.items() if value is not None}
    for item in items:
        name, value = parse_engine_arg(item)
        out[name] = value
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
    metrics: Annotated[bool, typer.Option(help="serve Prometheus metrics at /metrics (behind the API key)")] = True,
    metrics_key: Annotated[str | None, typer.Option(
        help="a bearer token that opens /metrics only, for the scraper (or set STEERLIB_METRICS_KEY)")] = None,
    metrics_no_auth: Annotated[bool, typer.Option(
        "--metrics-no-auth", help="serve /metrics without any key (e.g. behind a private network)")] = False,
    metrics_buckets: Annotated[str | None, typer.Option(
        help="comma-separated histogram buckets of the projection series")] = None,
    metrics_conversations: Annotated[int, typer.Option(
        help="most recently active conversations exported by id")] = 10,
    conversations: Annotated[int, typer.Option(
        help="conversations whose per-turn projections are kept (least recently active dropped; 0: off)")] = 1024,
    conversation_turns: Annotated[int, typer.Option(help="turns kept per conversation")] = 256,
    preset: Annotated[list[str] | None, typer.Option(
        "--preset", help="steering preset served as a model of its own, NAME=VECTOR@LAYER:COEF (repeatable; a "
                         "name given twice steers at each); listed in /v1/models and /api/tags, selected by a "
                         "request's model")] = None,
    drift_window: int = 20,
    drift_method: str = "zscore",
    drift_threshold: float = 3.0,
    drift_reference_size: int = 50,
    drift_include_steered: bool = False,
    alerts_path: Path | None = None,
    dtype: str = "float32",
    model: ModelOpt = None,
    engine: Annotated[str, typer.Option(help="hf (steerlib's engine) or vllm (vLLM with steerlib's plugin; "
                                             "needs the vLLM environment, make vllm-env)")] = "hf",
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM: tensor-parallel workers")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(help="vLLM: pipeline stages")] = None,
    data_parallel_size: Annotated[int | None, typer.Option(help="vLLM: engine replicas (steering refuses > 1)")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM: requests per step (default: --max-batch)")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(help="vLLM: tokens per step")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM's context limit (default: the model's)")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vLLM's memory fraction (on vLLM's CPU build: of the machine's memory)")] = None,
    enforce_eager: Annotated[bool, typer.Option(
        "--enforce-eager", "--vllm-eager", help="vLLM without torch.compile / CUDA graphs (starts faster)")] = False,
    enable_prefix_caching: Annotated[bool | None, typer.Option(
        "--enable-prefix-caching/--no-enable-prefix-caching", help="vLLM's prefix cache (default: on)")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(
        "--vllm-arg", help="any other vLLM engine argument, NAME=VALUE (VALUE as JSON when it parses; "
                           "repeatable)")] = None,
    max_steer_vectors: Annotated[int | None, typer.Option(
        help="vLLM: steering vector rows each worker keeps registered (LRU; default 256)")] = None,
) -> None:
    """OpenAI- and Ollama-compatible chat server: continuous batching with per-request steering, per-token
    trait projections and drift alerts."""
    from steerlib.serve import AppOptions, ServeOptions
    from steerlib.serve import serve as run_server
    from steerlib.serve.schema import parse_presets

    presets = parse_presets(preset or [])
    # Bad options are ValueErrors: main() prints them as one line, like every other command's. AppOptions checks
    # its numbers when built, ServeOptions.check the rest (reading only the model's config and the vector files).
    app_options = AppOptions(
        monitor_traits=tuple(monitor) if monitor else None, monitor_layer=monitor_layer, max_batch=max_batch,
        max_queue=max_queue, max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens,
        api_key=api_key, cors_origins=tuple(cors_origin or ()), host=host,
        allowed_hosts=tuple(allowed_host) if allowed_host else None, max_body_bytes=max_body_bytes,
        vector_dirs=tuple(vector_dir or ()), drift_include_steered=drift_include_steered, metrics=metrics,
        metrics_key=metrics_key, metrics_no_auth=metrics_no_auth,
        metrics_buckets=tuple(_floats(metrics_buckets)) if metrics_buckets else None,
        metrics_conversations=metrics_conversations, conversations=conversations,
        conversation_turns=conversation_turns, presets=presets)
    options = ServeOptions(model_path=model, vectors=_named_paths(vector), steer=tuple(_layer_coefs(steer or [])),
                           steer_vector=steer_vector, steer_mode=steer_mode, steer_positions=steer_positions,
                           app=app_options, port=port, drift_window=drift_window, drift_method=drift_method,
                           drift_threshold=drift_threshold, drift_reference_size=drift_reference_size,
                           alerts_path=alerts_path, dtype=dtype, engine=engine,
                           vllm_args=_vllm_args(vllm_arg or [], tensor_parallel_size=tensor_parallel_size,
                                                pipeline_parallel_size=pipeline_parallel_size,
                                                data_parallel_size=data_parallel_size, max_num_seqs=max_num_seqs,
                                                max_num_batched_tokens=max_num_batched_tokens,
                                                max_model_len=max_model_len,
                                                gpu_memory_utilization=gpu_memory_utilization,
                                                enforce_eager=enforce_eager or None,
                                                enable_prefix_caching=enable_prefix_caching,
                                                max_steer_vectors=max_steer_vectors))
    options.check()
    run_server(options)


@app.command()
def shiftcheck(
    vector: Annotated[Path, typer.Option(help="trait vectors folder (an extraction run) or .safetensors")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: VECTOR/shiftcheck)")] = None,
    trait: Annotated[str | None, typer.Option(help="trait (default: the vectors' trait)")] = None,
    judge: Annotated[str, typer.Option(help="auto | lexicon[:polarity] | self | openai:<model>")] = "auto",
    n_questions: int = 8,
    pair: Annotated[int, typer.Option(help="instruction pair for the system-prompt ladder")] = 0,
    shots: Annotated[str, typer.Option(help="comma-separated numbers of in-context examples")] = "0,1,2,4,8",
    negative_shots: Annotated[bool, typer.Option(help="also many-shot prompts with opposite examples")] = True,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    fresh: Annotated[bool, typer.Option(help="ignore earlier partial results")] = False,
    model: ModelOpt = None,
) -> None:
    """Prompt-induced shift: does the last prompt token's projection predict the judged trait? (per layer)"""
    from steerlib.commands.shiftcheck import shiftcheck_file

    result, folder = shiftcheck_file(vector, out, model_path=model, trait=trait, judge=judge,
                                     n_questions=n_questions, pair=pair, shots=_ints(shots),
                                     negative_shots=negative_shots, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, resume=not fresh)
    typer.echo(result.format())
    typer.echo(f"best layer {result.best_layer}: r = {result.best_r:.3f}; wrote {folder}")


@app.command()
def inventory(
    vector: Annotated[list[str] | None, typer.Option(help="NAME=PATH trait vectors to steer with (repeatable)")] = None,
    inventory_file: Annotated[str, typer.Option("--inventory", help="built-in name or JSON file")] = "big_five",
    coef: Annotated[float, typer.Option(help="steering coefficient for the matrix")] = 0.5,
    relative: Annotated[bool, typer.Option(help="coef as a fraction of the typical residual norm")] = True,
    layer: Annotated[int | None, typer.Option(help="steering layer (default: each vector's recommended)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the matrix as JSON (e.g. RUN_DIR/inventory.json)")] = None,
    model: ModelOpt = None,
) -> None:
    """Judge-free Likert inventory scored from option probabilities; with --vector, the steering effect matrix."""
    from steerlib.commands.inventory import inventory_file as run_inventory

    result = run_inventory(_named_paths(vector) if vector else None, model_path=model, inventory=inventory_file,
                           coef=coef, relative=relative, layer=layer, out=out)
    typer.echo(result.format())
    if out is not None and vector:
        typer.echo(f"wrote {out}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="extraction run folder (from steerlib extract)")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default RUN_DIR/report.html)")] = None,
    dose_coefs: Annotated[str | None, typer.Option(help="compute a dose-response first (comma-separated)")] = None,
    relative: Annotated[bool, typer.Option(help="dose coefficients relative to the residual norm")] = True,
    n_questions: Annotated[int, typer.Option(help="questions for the dose-response")] = 4,
    max_new_tokens: int = 32,
    model: ModelOpt = None,
) -> None:
    """Write one self-contained HTML page: sweep, dose-response, prompt shift, inventory, counts, settings."""
    from steerlib.commands.report import report_file

    path = report_file(run_dir, out, model_path=model, dose_coefs=_floats(dose_coefs) if dose_coefs else None,
                       relative=relative, n_questions=n_questions, max_new_tokens=max_new_tokens)
    typer.echo(f"wrote {path}")


@traits_app.command("list")
def traits_list() -> None:
    """List built-in traits."""
    from steerlib.traits.library import list_traits, load_trait

    for name in list_traits():
        typer.echo(f"{name:18s} {load_trait(name).description[:90]}")


@traits_app.command("show")
def traits_show(name: str) -> None:
    """Print a trait definition as JSON."""
    from steerlib.traits.library import load_trait

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
    from steerlib.commands.traits import new_trait_file

    trait, path = new_trait_file(name, description, out=out, model=llm, api_key=api_key,
                                 base_url=base_url or os.environ.get("STEERLIB_JUDGE_BASE_URL"))
    typer.echo(f"wrote {path}: {len(trait.instruction_pairs)} pairs, {len(trait.extraction_questions)} extraction "
               f"and {len(trait.eval_questions)} evaluation questions")


@app.command()
def export(
    vectors: Annotated[Path, typer.Argument(help="trait vectors folder/.safetensors (or any file load_vectors reads)")],
    out: Annotated[Path, typer.Option(help="output file")],
    format: Annotated[str, typer.Option("--format", help="gguf (llama.cpp control vector)")] = "gguf",
    layers: Annotated[str | None, typer.Option(help="comma-separated steerlib layers, 2..n (default: recommended)")] = None,
    coef: Annotated[float, typer.Option(help="scale baked into the file")] = 1.0,
    kind: Annotated[str | None, typer.Option(help="pooling kind (default: the vectors' default)")] = None,
    model_hint: Annotated[str, typer.Option(help="llama.cpp architecture name for controlvector.model_hint")] = "llama",
) -> None:
    """Export trait vectors for another tool (llama.cpp: steerlib layer L is written as direction.(L-1))."""
    from steerlib.commands.export import export_file

    path, written, names = export_file(vectors, out, layers=_ints(layers) if layers else None, coef=coef,
                                       kind=kind, model_hint=model_hint, format=format)
    typer.echo(f"wrote {path}: layers {written} as {', '.join(names)} (coef {coef:g})")


sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders: train one, decompose a vector with it.")
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def sae_train(
    out: Annotated[Path, typer.Option(help="SAE folder (SAELens format; cache and checkpoints inside; resumes)")],
    layer: Annotated[int, typer.Option(help="steerlib layer whose residual stream the SAE reads")],
    rollouts: Annotated[list[Path] | None, typer.Option(help="extraction run folder (repeatable)")] = None,
    text: Annotated[list[Path] | None, typer.Option(help="text file for the corpus (repeatable)")] = None,
    neutral: Annotated[bool, typer.Option(help="add the model's answers to the shipped neutral questions")] = True,
    expansion: int = 8,
    k: int = 32,
    epochs: int = 1,
    seed: int = 0,
    tokens_per_step: int = 4096,
    max_tokens: Annotated[int | None, typer.Option(help="stop harvesting after this many tokens")] = None,
    loss_samples: Annotated[int, typer.Option(help="corpus samples the LM loss is scored on, clean and with the "
                                                   "reconstruction spliced in")] = 32,
    model: ModelOpt = None,
) -> None:
    """Train a TopK SAE (eai-sparsify) on the model's own answers and text files; print its quality."""
    from steerlib.sae.run import train_run
    from steerlib.sae.train import SaeTrainConfig

    _, q, times = train_run(out, layer, model_path=model, rollouts=rollouts or (), neutral=neutral,
                            text_files=text or (), max_tokens=max_tokens, loss_samples=loss_samples,
                            cfg=SaeTrainConfig(expansion=expansion, k=k, epochs=epochs, seed=seed,
                                               tokens_per_step=tokens_per_step))
    typer.echo(f"wrote {out}: explained variance {q.explained_variance:.3f}, L0 {q.l0:.1f}, dead "
               f"{q.dead_fraction:.1%}, LM loss {q.loss_clean:.3f} -> {q.loss_spliced:.3f} "
               f"(+{q.loss_increase:.3f} nats/token); " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


@sae_app.command("decompose")
def sae_decompose(
    vector: Annotated[Path, typer.Argument(help="trait vectors (anything load_vectors reads)")],
    sae: Annotated[Path, typer.Option(help="SAE folder (SAELens format)")],
    rollouts: Annotated[list[Path] | None, typer.Option(help="extraction run: rank latents pos - neg")] = None,
    top: int = 10,
    snippets: Annotated[int, typer.Option(help="top-activating snippets per latent (from the SAE's cache)")] = 3,
    out: Annotated[Path | None, typer.Option(help="write the decomposition as JSON")] = None,
    model: ModelOpt = None,
) -> None:
    """The vector's top SAE latents by decoder cosine, against the random-vector null."""
    from steerlib.sae.run import decompose_run

    d = decompose_run(vector, sae, model_path=model, rollouts=rollouts or (), top=top, snippets=snippets, out=out)
    typer.echo(f"layer {d.layer}; null best cosine mean {d.null['mean']:.3f}, p99 {d.null['p99']:.3f}; rebuilt "
               + ", ".join(f"top{k} {v:.1%}" for k, v in d.rebuilt.items()) + f"; vector: {' '.join(d.vector_names)}")
    for row in d.latents:
        extra = f" pos-neg {row['pos_minus_neg']:+.3f}" if "pos_minus_neg" in row else ""
        typer.echo(f"  latent {row['latent']:>6} cos {row['cosine']:+.3f}{extra}  {' '.join(row.get('names', []))}")
        for snip in row.get("snippets", [])[:snippets]:
            typer.echo(f"      {snip['activation']:.1f}: {' '.join(snip['text'].split())}")


@app.command()
def diff(
    base: Annotated[str, typer.Argument(help="base model folder or .gguf ('embedded' for the embedded model)")],
    finetuned: Annotated[Path, typer.Argument(help="finetuned HF folder or LoRA adapter folder")],
    sae: Annotated[Path, typer.Option(help="SAE folder trained on the base model")],
    vector: Annotated[list[str] | None, typer.Option(help="NAME=PATH trait vectors for the cosines")] = None,
    top: int = 10,
    screen: Annotated[int, typer.Option(help="steer the base model with the top N latents")] = 0,
    screen_trait: Annotated[str | None, typer.Option(help="which --vector scores the screen")] = None,
    judge: Annotated[str | None, typer.Option(help="judge for the screen (lexicon, self, openai:<model>)")] = None,
    max_questions: Annotated[int | None, typer.Option(help="use the first N neutral questions")] = None,
    max_new_tokens: int = 48,
    out: Annotated[Path | None, typer.Option(help="write the diff as JSON")] = None,
) -> None:
    """Model diffing through an SAE: latents ranked by mean activation change, beside the SAE-free baseline."""
    from steerlib.sae.run import diff_run

    result, rows = diff_run(None if base == "embedded" else base, finetuned, sae,
                            vectors=_named_paths(vector or []), top=top, screen=screen, screen_trait=screen_trait,
                            judge=judge, max_questions=max_questions, max_new_tokens=max_new_tokens, out=out)
    typer.echo(f"layer {result.layer}, {result.n_tokens} tokens; mean residual difference norm "
               f"{result.baseline_norm:.3f}, cosines " + ", ".join(f"{k} {v:+.3f}" for k, v in
                                                                result.baseline_cosines.items()))
    for label, items in (("increased", result.increased), ("decreased", result.decreased)):
        typer.echo(label + ":")
        for r in items:
            cos = " ".join(f"{k} {v:+.2f}" for k, v in r["cosines"].items())
            typer.echo(f"  latent {r['latent']:>6} diff {r['diff']:+.3f} ({r['base']:.3f} -> {r['finetuned']:.3f}) {cos}")
    for r in rows:
        typer.echo(f"screen latent {r['latent']}: projection {r['projection']:.2f} judge {r.get('judge')}")


def main() -> None:
    """Entry point: bad input ends with one clear line, not a traceback."""
    from steerlib.traits.judges import JudgeError

    try:
        app()
    except (ValueError, OSError, NotImplementedError, JudgeError) as exc:
        # OSError: a permission or disk problem the checks could not foresee still gets one line.
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
