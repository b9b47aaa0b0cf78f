"""One HTML page per extraction run: is this vector any good?

``write_report(run_dir)`` reads what ``steerlib extract`` wrote (``vectors.json``, ``sweep.json``) and what the
evidence commands add to the same folder:

* ``dose.json``: a dose-response with example answers per coefficient (``run_dose``, or
  ``steerlib report --dose-coefs``);
* ``shiftcheck/shiftcheck.json``: the prompt-induced shift experiment (``steerlib shiftcheck``);
* ``inventory.json``: the inventory matrix (``steerlib inventory --out RUN_DIR/inventory.json``);
* ``sae_decompose.json`` and ``sae_diff.json`` (optional, shown only when present): the vector's SAE
  decomposition (``steerlib sae decompose RUN_DIR --sae SAE --out RUN_DIR/sae_decompose.json``) and a model diff
  (``steerlib diff BASE FINETUNED --sae SAE --out RUN_DIR/sae_diff.json``);

and writes a single self-contained ``report.html``: plots are PNGs embedded as base64, styles are inline, and
nothing is fetched when it is opened. A section whose data is missing says so and names the command that
makes it.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from steerlib.core.checks import load_json
from steerlib.steering.dose import DoseResponse

DOSE_FILE = "dose.json"
INVENTORY_FILE = "inventory.json"
SHIFT_DIR = "shiftcheck"
REPORT_FILE = "report.html"
SAE_DECOMPOSE_FILE = "sae_decompose.json"
SAE_DIFF_FILE = "sae_diff.json"

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; }
td.text { text-align: left; max-width: 640px; }
img { max-width: 100%; border: 1px solid #ddd; }
.missing { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5em 1em; }
.verdict { background: #eef6ee; border-left: 4px solid #3a3; padding: .5em 1em; }
code, pre { background: #f6f6f6; padding: 1px 4px; font-size: 13px; }
pre { padding: .6em; overflow-x: auto; }
"""


def _e(value: object) -> str:
    """Any value from a run's files as page text: every value that reaches the page goes through here."""
    return html.escape(str(value), quote=True)


class _FileError(ValueError):
    """A run file whose content the report cannot use; the message names the file."""


def _object(path: Path, what: str) -> dict:
    """A run file that must hold a JSON object (a list or a string is refused naming the file)."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise _FileError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def _section(path: Path, what: str, build: Callable[[], str]) -> str:
    """Build one section from ``path``; a field of the wrong type or shape becomes one line naming the file.

    The run's files are data written by other runs (or by hand): a missing key, an extra key, a string where a
    number belongs, lists of different lengths all fail in the dataclass or the formatting, here.
    """
    try:
        return build()
    except _FileError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError):
            detail = f"missing field {exc}"
        raise _FileError(f"{path}: malformed {what} ({detail}); re-run the command that wrote it") from None


def _png(plot: Callable[[Path], Path]) -> str:
    """Run a ``plot(path)`` helper into memory and return an <img> tag with the PNG inlined."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = plot(Path(tmp) / "plot.png")
        data = Path(path).read_bytes()
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _missing(what: str, how: str) -> str:
    return f'<p class="missing">No {html.escape(what)} in this run folder. Make it with <code>{html.escape(how)}</code>.</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], text_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="text"' if i in text_cols else ""
            shown = f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
            cells.append(f"<td{cls}>{html.escape(shown)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


# -- dose-response data -----------------------------------------------------------------------------------


def save_dose(dose: DoseResponse, path: str | Path, questions: Sequence[str], relative: bool) -> Path:
    path = Path(path)
    path.write_text(json.dumps({**asdict(dose), "questions": list(questions), "relative": relative}, indent=1,
                               ensure_ascii=False))
    return path


def load_dose(path: str | Path) -> tuple[DoseResponse, list[str], bool]:
    """A saved dose-response, its questions and whether its coefficients were relative."""
    data = _object(Path(path), "dose-response file")
    questions, relative = data.pop("questions", []), bool(data.pop("relative", False))
    if not isinstance(questions, list):
        raise ValueError(f"questions must be a list, got {type(questions).__name__}")
    return DoseResponse(**data), questions, relative


def run_dose(model, tokenizer, run_dir: str | Path, coefs: Sequence[float], *, n_questions: int = 4,
             max_new_tokens: int = 32, relative: bool = True, layer: int | None = None,
             capability_items: int | None = 4) -> Path:
    """Steer at the run's recommended layer with each coefficient on held-out questions; save ``dose.json``.

    Args:
        model: the model the run was extracted from.
        tokenizer: its tokenizer.
        run_dir: the extraction run folder.
        coefs: steering coefficients (relative to the typical residual norm when ``relative``).
        n_questions: evaluation questions of the run's trait to answer at each coefficient.
        max_new_tokens: answer length (greedy).
        relative: interpret ``coefs`` relative to the residual norm.
        layer: steering layer (default: the vectors' recommended layer).
        capability_items: items of each kind of the capability set scored at each coefficient (None: all; 0: no
            capability measure).
    """
    from steerlib.core.chat import format_prompt
    from steerlib.core.loading import load_vectors
    from steerlib.steering.dose import dose_response
    from steerlib.steering.steer import build_readout
    from steerlib.traits.judges import JudgeError, make_judge
    from steerlib.traits.library import TraitError, load_trait

    if not coefs:
        raise ValueError("no coefficients given for the dose-response")
    tv = load_vectors(run_dir, model)
    layer = layer if layer is not None else tv.recommended_layer
    if layer is None:
        raise ValueError(f"{run_dir}: the vectors have no recommended layer; pass a layer")
    trait = load_trait(tv.trait)
    questions = list(trait.eval_questions[:n_questions])
    try:
        judge = make_judge("auto", trait, model=model, tokenizer=tokenizer)
    except (JudgeError, TraitError):
        judge = None  # the table still shows projections and answers
    prompts = [format_prompt(tokenizer, q) for q in questions]
    monitor = build_readout(model, {tv.trait: tv}, [layer])
    probe = capability_probe(model, tokenizer, capability_items)
    dose = dose_response(model, tokenizer, prompts, tv, layer, list(coefs), readout=monitor, judge=judge,
                         questions=questions, relative=relative, max_new_tokens=max_new_tokens, capability=probe)
    return save_dose(dose, Path(run_dir) / DOSE_FILE, questions, relative)


def capability_probe(model, tokenizer, items_per_kind: int | None = 4):
    """The capability probe a dose-response runs with: ``items_per_kind`` items of each kind of the shipped set
    (None: all of them; 0: no probe, None is returned)."""
    from steerlib.evaluation.capability import CapabilityProbe, load_capability_set

    if items_per_kind == 0:
        return None
    return CapabilityProbe(model, tokenizer, load_capability_set(limit=items_per_kind))


# -- sections ---------------------------------------------------------------------------------------------


def _settings_section(meta: dict) -> str:
    keys = ["model", "trait", "method", "recommended_layer", "layer_rule", "judge", "coherence_judge", "thresholds",
            "config", "probe_train_accuracy", "library_version", "seconds"]
    rows = []
    for k in keys:
        if k in meta:
            v = meta[k]
            if k == "probe_train_accuracy" and isinstance(v, list):
                v = f"min {min(v):.2f}, max {max(v):.2f} over layers"
            rows.append((k, v if isinstance(v, str | int | float) else json.dumps(v)))
    return "<h2>Settings</h2>" + (_table(["setting", "value"], rows, text_cols=(1,)) if rows else
                                  _missing("vector metadata", "steerlib extract"))


def _counts_section(meta: dict) -> str:
    counts = meta.get("counts")
    if not counts:
        return "<h2>Kept and dropped responses</h2>" + _missing("kept/dropped counts", "steerlib extract")
    rows = [(pol, c.get("generated"), c.get("kept"), c.get("dropped"), c.get("unscored"))
            for pol, c in counts.items()]
    th = meta.get("thresholds", {})
    note = (f"<p>Positive responses are kept when the judge scores them at least {_e(th.get('positive'))}, negative "
            f"ones when at most {_e(th.get('negative'))}.</p>") if th else ""
    return ("<h2>Kept and dropped responses</h2>" + note +
            _table(["polarity", "generated", "kept", "dropped", "unscored"], rows))


def _sweep_section(run: Path, meta: dict) -> str:
    from steerlib.extraction.sweep import LayerSweep

    data = None
    if (run / "sweep.json").is_file():
        data = _object(run / "sweep.json", "layer sweep file")
    elif "sweep" in meta:
        data = meta["sweep"]
    if data is None:
        return "<h2>Layer sweep</h2>" + _missing("layer sweep", "steerlib extract")
    sweep = LayerSweep(**data)
    best = sweep.layers.index(sweep.recommended_layer)
    return ("<h2>Layer sweep</h2>"
            f"<p>Separation of positive from negative {_e(sweep.evaluated_on)} responses along the vector, per "
            f"layer. Recommended layer <b>{_e(sweep.recommended_layer)}</b> (Cohen's d {sweep.cohens_d[best]:.2f}, "
            f"AUROC {sweep.auroc[best]:.3f}).</p>" + _png(lambda p: sweep.plot(p)))


def _dose_section(run: Path) -> str:
    path = run / DOSE_FILE
    head = "<h2>Dose-response and steered answers</h2>"
    if not path.is_file():
        return head + _missing("dose-response", f"steerlib report {run} --dose-coefs=-0.5,0,0.5")
    dose, questions, relative = load_dose(path)
    unit = "x typical residual norm" if relative else "(raw)"
    rows = [(c, s, p) for c, s, p in zip(dose.coefs, dose.scores, dose.projections, strict=True)]
    columns = ["coef", "mean judge score", "mean projection"]
    cost = ""
    if dose.capability:
        rows = [(*r, None if a is None else round(100 * a, 1), None if x is None else round(x, 2))
                for r, a, x in zip(rows, dose.capability, dose.perplexity, strict=True)]
        columns += ["capability accuracy (%)", "held-out perplexity"]
        cost = f"<p>{_e(dose.format().splitlines()[-1])}. Capability: log-likelihood accuracy on steerlib's " \
               "multiple-choice set; perplexity: of the unsteered model's own answers to held-out questions.</p>"
    out = [head, f"<p>Steering at layer {_e(dose.layer)}, coefficients {unit}, on {len(questions)} held-out "
           "questions.</p>",
           _png(lambda p: dose.plot(p)), cost, _table(columns, rows)]
    for q, question in enumerate(questions):
        out.append(f"<h3>{html.escape(question)}</h3>")
        out.append(_table(["coef", "answer"], [(c, texts[q]) for c, texts in zip(dose.coefs, dose.samples,
                                                                                  strict=True)], text_cols=(1,)))
    return "".join(out)


def _shift_section(run: Path) -> str:
    from steerlib.evaluation.prompt_shift import SUMMARY_FILE, ShiftCheck

    head = "<h2>Prompt-induced shift: does the last prompt token predict the answer?</h2>"
    path = run / SHIFT_DIR / SUMMARY_FILE
    if not path.is_file():
        return head + _missing("prompt-shift results", f"steerlib shiftcheck --vector {run}")
    res = ShiftCheck.load(path)
    li = res.layers.index(res.best_layer)
    rows = [(c.name, c.n, c.mean_score, c.mean_projection[li]) for c in res.conditions]
    return (head +
            f'<p class="verdict">Best layer <b>{_e(res.best_layer)}</b>: Pearson r = <b>{res.best_r:.2f}</b> between '
            f"the last-prompt-token projection and the judge score over {len(res.conditions)} conditions "
            f"(r = {res.r_responses[li]:.2f} over {len(res.responses)} single responses; "
            + "; ".join(f"{_e(fam)} ladder alone r = {v[li]:.2f}" for fam, v in res.r_family.items())
            + ").</p>"
            + _png(lambda p: res.plot_scatter(p)) + _png(lambda p: res.plot_layers(p))
            + _table(["condition", "n", "mean judge score", f"mean projection (layer {res.best_layer})"], rows,
                     text_cols=(0,)))


def _inventory_section(run: Path) -> str:
    from steerlib.evaluation.inventory import InventoryMatrix

    head = "<h2>Personality inventory (judge-free)</h2>"
    path = run / INVENTORY_FILE
    if not path.is_file():
        return head + _missing("inventory matrix", f"steerlib inventory --vector NAME={run} --out {run / INVENTORY_FILE}")
    mat = InventoryMatrix.load(path)
    unit = "x typical residual norm" if mat.relative else "(raw)"
    rows = [("baseline", *[mat.baseline[s] for s in mat.scales])]
    rows += [(v, *[float(x) for x in mat.effects[i]]) for i, v in enumerate(mat.vectors)]
    own = mat.own_scale_largest()
    verdict = ""
    if own:
        hits = sum(own.values())
        verdict = (f'<p class="verdict">{hits} of {len(own)} vectors move their own scale more than any other '
                   "scale.</p>")
    return (head + "<p>Scores 1-5 from the model's next-token probabilities of the Likert options (expected value, "
            f"reverse-keyed items flipped). Rows: change while steering with coefficient {mat.coef:g} {unit} at "
            f"layers {_e(list(mat.layers))}.</p>" + verdict + _diagnostics(mat) + _png(lambda p: mat.plot(p))
            + _table(["", *mat.scales], rows, text_cols=(0,)))


def _diagnostics(mat) -> str:
    d = mat.diagnostics
    if not d:
        return ""
    return (f"<p>Unsteered, the model puts {d.get('option_mass', float('nan')):.2f} of its next-token probability on "
            f"the five options (the rest on other words), and its raw item ratings spread by "
            f"{d.get('rating_sd', float('nan')):.2f} (standard deviation): a model that rates every statement alike "
            "sits at the midpoint of every keyed scale, and steering can then move little.</p>")


def _sae_decompose_section(run: Path) -> str:
    d = _object(run / SAE_DECOMPOSE_FILE, "SAE decomposition")
    null = d["null"]
    rows = [(r["latent"], float(r["cosine"]), r.get("pos_minus_neg"), " ".join(r.get("names", [])))
            for r in d["latents"]]

    def plot(path: Path) -> Path:
        from steerlib.store.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar([str(r[0]) for r in rows], [abs(r[1]) for r in rows], color="#4a7")
        ax.axhline(float(null["p99"]), color="#c33", linestyle="--", label="random vectors, 99th percentile")
        ax.set_xlabel("latent")
        ax.set_ylabel("|cosine| with the vector")
        ax.legend(fontsize=8)
        return save_figure(fig, path)

    rebuilt = ", ".join(f"top {k}: {float(v):.1%}" for k, v in d["rebuilt"].items())
    return ("<h2>SAE decomposition</h2>"
            f"<p>Decoder rows of the SAE at layer {_e(d['layer'])} closest to the vector. A random unit vector's best "
            f"|cosine| against the same dictionary is {float(null['mean']):.3f} on average "
            f"(99th percentile {float(null['p99']):.3f}). Share of the vector rebuilt from its top latents: "
            f"{_e(rebuilt)}.</p>" + _png(plot)
            + _table(["latent", "cosine", "pos - neg activation", "logit-lens tokens"], rows, text_cols=(3,)))


def _sae_diff_section(run: Path) -> str:
    data = _object(run / SAE_DIFF_FILE, "SAE model diff")
    d = data["diff"]
    ranked = d["increased"] + list(reversed(d["decreased"]))
    trait = next(iter(d["baseline_cosines"]), None)

    def plot(path: Path) -> Path:
        from steerlib.store.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3))
        colors = ["#4a7" if trait and abs(r["cosines"].get(trait, 0)) >= 0.3 else "#999" for r in ranked]
        ax.bar(range(len(ranked)), [r["diff"] for r in ranked], color=colors)
        ax.set_xticks(range(len(ranked)), [str(r["latent"]) for r in ranked], rotation=90, fontsize=7)
        ax.set_ylabel("mean activation, finetuned - base")
        ax.set_title(f"green: |cosine| >= 0.3 with {trait}" if trait else "latents by activation change", fontsize=9)
        return save_figure(fig, path)

    rows = [(r["latent"], float(r["diff"]), float(r["base"]), float(r["finetuned"]),
             " ".join(f"{k} {float(v):+.2f}" for k, v in r["cosines"].items())) for r in ranked]
    base = ", ".join(f"{k} {float(v):+.3f}" for k, v in d["baseline_cosines"].items())
    screen = data.get("screen") or []
    return ("<h2>Model diff through the SAE</h2>"
            f"<p>Latents at layer {_e(d['layer'])} ranked by the change of their mean activation over "
            f"{_e(d['n_tokens'])} teacher-forced tokens. SAE-free baseline: the mean residual difference "
            f"(norm {float(d['baseline_norm']):.3f}) has cosine {_e(base or '-')} with the trait vectors.</p>"
            + _png(plot) + _table(["latent", "diff", "base", "finetuned", "decoder cosines"], rows, text_cols=(4,))
            + (_table(["steered latent", "trait projection", "judge"],
                      [(r["latent"] if r["latent"] is not None else "none", float(r["projection"]), r.get("judge"))
                       for r in screen]) if screen else ""))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's self-contained HTML report (default ``RUN_DIR/report.html``) and return its path.

    Args:
        run_dir: a folder written by ``steerlib extract``.
        out: where to write the page.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}")
    meta_path = run / "vectors.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run} is not an extraction run folder (no vectors.json; run steerlib extract)")
    meta = _object(meta_path, "vectors metadata file")
    title = f"steerlib report: {meta.get('trait', '?')} on {meta.get('model', '?')}"
    sweep_from = run / "sweep.json" if (run / "sweep.json").is_file() else meta_path
    sections = [_section(meta_path, "vectors metadata", lambda: _settings_section(meta)),
                _section(meta_path, "vectors metadata", lambda: _counts_section(meta)),
                _section(sweep_from, "layer sweep", lambda: _sweep_section(run, meta)),
                _section(run / DOSE_FILE, "dose-response", lambda: _dose_section(run)),
                _section(run / SHIFT_DIR / "shiftcheck.json", "prompt-shift results", lambda: _shift_section(run)),
                _section(run / INVENTORY_FILE, "inventory matrix", lambda: _inventory_section(run))]
    sections += [_section(run / name, what, lambda build=build: build(run))  # only when the run has them
                 for name, what, build in ((SAE_DECOMPOSE_FILE, "SAE decomposition", _sae_decompose_section),
                                           (SAE_DIFF_FILE, "SAE model diff", _sae_diff_section))
                 if (run / name).is_file()]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Run folder <code>{html.escape(str(run.resolve()))}</code>; written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}.</p>" + "".join(sections) + "</body></html>")
    path = Path(out) if out is not None else run / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
