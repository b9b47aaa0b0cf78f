"""Model diffing on fine-tunes the project makes itself: context distillation of the optimistic persona.

Trains two LoRAs on the embedded model: "persona" on the positive-persona extraction answers with the system
prompt removed (context distillation: the model learns to answer optimistically unprompted) and "control" on its
own neutral answers, the same way. Each is diffed against the base model through the SAE on identical
teacher-forced text (neutral questions plus the base model's answers). Reports the top-10 increased latents with
their decoder cosine to the optimistic vector, whether one with cosine >= 0.3 also appears in the vector's top-20
decomposition, the SAE-free baseline's cosine (mean residual difference vs the vector), and optionally a steering
screen of the top latents (trait projection and lexicon score).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/sae_diff_lora.py --vectors runs/optimistic \
        --sae runs/sae_embedded --rollouts runs/optimistic
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from steerlib.core.chat import format_prompt
from steerlib.core.loading import load_vectors
from steerlib.core.models import load_model
from steerlib.core.sae_format import load_sae
from steerlib.extraction.extract import load_responses
from steerlib.finetuning.training import lora_finetune
from steerlib.sae.decompose import decompose
from steerlib.sae.diff import model_diff
from steerlib.sae.screen import screen_latents
from steerlib.steering.calibration import reference_questions
from steerlib.steering.generation import generate
from steerlib.store.samples import Sample
from steerlib.traits.judges import make_judge


def _samples(pairs: list[tuple[str, str]]) -> list[Sample]:
    return [Sample(index=i, line=i + 1, messages=({"role": "user", "content": q},), response=a)
            for i, (q, a) in enumerate(pairs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--rollouts", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--screen", type=int, default=5)
    ap.add_argument("--coef", type=float, default=0.5, help="screen: added norm / median residual norm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sae = load_sae(args.sae)
    base, tok = load_model()
    tv = load_vectors(args.vectors, base)
    vec = tv.get(sae.layer)
    decomposition = [r["latent"] for r in decompose(vec, sae, top=20).latents]
    questions = reference_questions()
    prompts = [format_prompt(tok, q) for q in questions]
    t = time.perf_counter()
    answers = [g.text for g in generate(base, tok, prompts, max_new_tokens=48)]
    persona = [(r["question"], r["response"]) for r in load_responses(args.rollouts) if r.get("polarity") == "pos"]
    control = list(zip(questions, answers, strict=True))
    result: dict = {"layer": sae.layer, "base_answers_s": time.perf_counter() - t, "steps": args.steps,
                    "persona_samples": len(persona), "control_samples": len(control)}
    for name, pairs in (("persona", persona), ("control", control)):
        t = time.perf_counter()
        tuned = lora_finetune(load_model()[0], tok, _samples(pairs), steps=args.steps, lr=args.lr).model
        train_s = time.perf_counter() - t
        diff = model_diff(base, tuned, tok, sae, prompts, answers, vectors={"optimistic": vec}, top=10)
        hits = [r["latent"] for r in diff.increased if abs(r["cosines"]["optimistic"]) >= 0.3]
        row = {"train_s": train_s, "baseline_cosine": diff.baseline_cosines["optimistic"],
               "baseline_norm": diff.baseline_norm,
               "top10_increased": [(r["latent"], round(r["diff"], 4), round(r["cosines"]["optimistic"], 3))
                                   for r in diff.increased],
               "top10_decreased": [(r["latent"], round(r["diff"], 4), round(r["cosines"]["optimistic"], 3))
                                   for r in diff.decreased],
               "latents_cos_ge_0.3": hits, "of_them_in_decomposition_top20": [i for i in hits if i in decomposition]}
        if name == "persona" and args.screen > 0:
            judge = make_judge("lexicon:optimistic", "optimistic")
            folder = Path(args.sae)
            row["screen"] = screen_latents(base, tok, folder, [r["latent"] for r in diff.increased[: args.screen]],
                                           questions[:16], vec, sae.layer, args.coef * diff.residual_norm, judge=judge)
        result[name] = row
        print(name, json.dumps(row, indent=2), flush=True)
    out = Path(args.out or Path(args.sae) / "diff_lora.json")
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
