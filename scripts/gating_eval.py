"""Must-show experiment of issue 18: gated steering and a calibrated cap on the embedded model.

40 prompts: 20 neutral questions (the template's default system prompt) and the same 20 under a system prompt
that pushes the model toward pessimism. Each is answered greedily

* unsteered;
* steering toward optimism (``add`` of the optimistic vector at one layer) **ungated**;
* the same edit **gated** on the pessimism projection (the projection on the negated vector at the edit's layer):
  it applies only where that projection is above a calibrated percentile of it (``--gate-percentiles``), per token
  and latched (the steered edits and their gates cover ``--positions``, by default the generated tokens);
* with a **calibrated cap**: pessimism capped at its 75th percentile over a layer range (the same as flooring the
  optimism projection at its 25th percentile).

For each it reports the fraction of neutral answers token-identical to the unsteered ones and the mean change of
VADER's compound score (-1..1) on the pushed prompts, and it plots the per-layer mean pessimism projection of the
pushed answers before and after the cap. Needs the vectors (``make demo``, or ``steerlib extract``) and their
calibration (``steerlib calibrate --vector runs/optimistic``).

    python scripts/gating_eval.py --vector runs/optimistic --layer 16 --coef 0.3 --cap-layers 16-22 \
        --gate-percentiles 90,95,99            # results and reading: docs/gating.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import steerlib as sl
from steerlib.steering.calibration import Calibration, Percentile, calibrated_cap
from steerlib.steering.steer import When

QUESTIONS = [
    "How should I spend a free Saturday?", "What do you think about learning to cook?",
    "How is the weather usually in spring?", "What is a good book to read on holiday?",
    "How do I start running regularly?", "What will my first week at a new job be like?",
    "How do I make friends in a new city?", "What do you think of public libraries?",
    "How can I get better at chess?", "What should I expect when I move to a new flat?",
    "How do people celebrate birthdays?", "What is it like to learn the piano as an adult?",
    "How will technology change schools?", "What should I plant in a small garden?",
    "How do I prepare for a long train journey?", "What do you think about working from a cafe?",
    "How does a team finish a big project?", "What is a nice way to spend an evening at home?",
    "How do I get ready for an exam next month?", "What happens at a farmers' market?",
]
PUSH = ("You are a gloomy, deeply pessimistic assistant. You expect things to go wrong, dwell on risks and "
        "disappointments, and never sound hopeful.")


def _layers(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vector", default="runs/optimistic")
    parser.add_argument("--layer", type=int, default=16, help="steering and gate layer")
    parser.add_argument("--coef", type=float, default=0.3, help="relative coefficient of the optimism add")
    parser.add_argument("--gate-percentiles", default="95",
                        help="comma-separated calibrated percentiles of pessimism the gate opens above")
    parser.add_argument("--positions", default="response",
                        help="tokens the gated edits (and their gates) cover: all | response | ...")
    parser.add_argument("--gates-only", action="store_true",
                        help="run only the unsteered baseline and the gates (not the ungated edit or the cap)")
    parser.add_argument("--cap-layers", default="16-22")
    parser.add_argument("--cap-percentile", type=float, default=75.0, help="percentile of pessimism to cap at")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="runs/gating_eval")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    model, tok = sl.load_model(device="cpu")
    tv = sl.load_vectors(args.vector, model)
    cal = Calibration.load(args.vector, model)
    layer = args.layer
    cap_layers = _layers(args.cap_layers)
    # Pessimism is the negated optimism direction: its p-th percentile is minus optimism's (100 - p)-th.
    gate_pcts = [float(x) for x in args.gate_percentiles.split(",")]
    gate_ts = {p: -cal.value(layer, 100 - p) for p in gate_pcts}
    neutral = [sl.format_prompt(tok, q) for q in QUESTIONS]
    pushed = [sl.format_prompt(tok, q, PUSH) for q in QUESTIONS]
    all_layers = list(range(1, sl.get_layout(model).n_layers + 1))
    readout = sl.build_readout(model, {"optimistic": tv}, all_layers)

    configs = {"unsteered": []}
    if not args.gates_only:
        configs["ungated"] = sl.build_ops(model, tv, layer, args.coef, relative=True, positions=args.positions)
    for pct, threshold in gate_ts.items():
        for latch in (False, True):
            configs[f"gated p{pct:g} ({'latched' if latch else 'per token'})"] = sl.build_ops(
                model, tv, layer, args.coef, relative=True, positions=args.positions,
                when=When(-tv, above=threshold, latch=latch))
    cap_name = f"cap p{args.cap_percentile:g} layers {args.cap_layers}"
    if not args.gates_only:
        configs[cap_name] = calibrated_cap(model, tv, cal, Percentile(100 - args.cap_percentile, side="min"),
                                           cap_layers)
    vader = SentimentIntensityAnalyzer()
    runs = {}
    for name, ops in configs.items():
        gens = sl.generate(model, tok, neutral + pushed, steering=ops, readout=readout,
                           max_new_tokens=args.max_new_tokens)
        runs[name] = gens
        print(f"{name}: done ({time.time() - started:.0f} s)", flush=True)

    base = runs["unsteered"]
    n = len(QUESTIONS)
    rows = []
    for name, gens in runs.items():
        identical = sum(g.token_ids == b.token_ids for g, b in zip(gens[:n], base[:n], strict=True)) / n
        change = [vader.polarity_scores(g.text)["compound"] - vader.polarity_scores(b.text)["compound"]
                  for g, b in zip(gens[n:], base[n:], strict=True)]
        neutral_change = [vader.polarity_scores(g.text)["compound"] - vader.polarity_scores(b.text)["compound"]
                          for g, b in zip(gens[:n], base[:n], strict=True)]
        rows.append({"config": name, "neutral_identical": identical,
                     "pushed_vader_change": sum(change) / n, "neutral_vader_change": sum(neutral_change) / n})

    summary = {"layer": layer, "relative_coef": args.coef, "gate_thresholds": gate_ts, "positions": args.positions,
               "gate": f"pessimism projection at layer {layer} >= its calibrated percentile",
               "results": rows, "examples": {name: [gens[n].text, gens[0].text] for name, gens in runs.items()},
               "seconds": round(time.time() - started, 1)}
    if cap_name in runs:
        # Per-layer mean pessimism projection of the pushed answers' tokens, before and after the cap.
        def per_layer(gens) -> torch.Tensor:
            return -torch.cat([g.projections[:, :, 0] for g in gens]).mean(0)  # [n_layers]

        before, after = per_layer(base[n:]), per_layer(runs[cap_name][n:])
        bound = {x: -cal.value(x, 100 - args.cap_percentile) for x in cap_layers}
        excess = max(float((-torch.cat([g.projections[:, li - 1, 0] for g in runs[cap_name]]) - bound[li]).max())
                     for li in cap_layers)
        summary.update({"cap": f"pessimism <= its calibrated p{args.cap_percentile:g} at layers {args.cap_layers}",
                        "max_capped_projection_minus_bound": excess,
                        "per_layer_pessimism_pushed": {"layers": all_layers, "before": before.tolist(),
                                                       "after_cap": after.tolist()}})
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(all_layers, before.tolist(), marker="o", label="unsteered (pushed prompts)")
        ax.plot(all_layers, after.tolist(), marker="o",
                label=f"capped at p{args.cap_percentile:g}, layers {args.cap_layers}")
        ax.plot(cap_layers, [bound[x] for x in cap_layers], "k--", label=f"calibrated p{args.cap_percentile:g}")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean pessimism projection")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "cap_projections.png", dpi=120)
        print(f"max (capped projection - bound) at the capped layers: {excess:.2e}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    thresholds = {f"p{p:g}": round(t, 3) for p, t in gate_ts.items()}
    print(f"\ngate thresholds (pessimism at layer {layer}): {thresholds}")
    print(f"{'config':32s} {'neutral identical':>18s} {'pushed VADER change':>20s} {'neutral VADER change':>21s}")
    for r in rows:
        print(f"{r['config']:32s} {r['neutral_identical']:18.2f} {r['pushed_vader_change']:+20.3f} "
              f"{r['neutral_vader_change']:+21.3f}")
    print(f"wrote {out}/summary.json in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
