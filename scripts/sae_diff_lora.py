"""Model diffing on fine-tunes the project makes itself: context distillation of the optimistic persona.

Trains two LoRAs on the embedded model: "persona" on the positive-persona extraction answers with the system
prompt removed (context distillation: the model learns to answer optimistically unprompted) and "control" on its
own answers to the second half of the shipped neutral questions, the same way. Each is diffed against the base
model through the SAE on identical teacher-forced text: the first half of the neutral questions plus the base
model's own answers (held out from both LoRAs). Reports the top-10 increased latents with
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
    ap.add_argument("--screen", type=int, default=3)
    ap.add_argument("--coef", type=float, default=0.5, help="screen: added norm / median residual norm")
    ap.add_argument("--questions", type=int, default=40,
                    help="the first N neutral questions are diffed, the rest train the control LoRA")
    ap.add_argument("--adapters", default="runs/sae_loras", help="where the two LoRA adapters are kept")
    ap.add_argument("--train-only", action="store_true", help="train and save the adapters, then stop")
    ap.add_argument("--only", choices=("persona", "control"), default=None, help="train/diff one adapter only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, tok = load_model()
    # the base model's own greedy answers to the 80 neutral questions, written by sae_train_embedded.py
    neutral = [json.loads(line) for line in (Path(args.sae) / "corpus" / "neutral.jsonl").read_text().splitlines()]
    questions = reference_questions()
    half = min(args.questions, len(questions) // 2)
    prompts = [format_prompt(tok, q) for q in questions[:half]]  # diffed on these (held out from both LoRAs)
    answers = [n["response"] for n in neutral[:half]]
    persona = [(r["question"], r["response"]) for r in load_responses(args.rollouts) if r.get("polarity") == "pos"]
    control = [(q, n["response"]) for q, n in zip(questions[half:], neutral[half:], strict=True)]
    adapters = Path(args.adapters)
    train_s = {}
    names = ("persona", "control") if args.only is None else (args.only,)
    for name, pairs in (("persona", persona), ("control", control)):
        if name not in names:
            continue
        if not (adapters / name / "adapter_config.json").is_file():
            t = time.perf_counter()
            tuned = lora_finetune(load_model().model, tok, _samples(pairs), steps=args.steps, lr=args.lr).model
            tuned.save_pretrained(adapters / name)
            train_s[name] = time.perf_counter() - t
            print(f"trained {name} LoRA in {train_s[name]:.0f} s", flush=True)
    if args.train_only:
        return
    sae = load_sae(args.sae)
    tv = load_vectors(args.vectors, base)
    vec = tv.get(sae.layer)
    decomposition = [r["latent"] for r in decompose(vec, sae, top=20).latents]
    result: dict = {"layer": sae.layer, "steps": args.steps, "train_s": train_s,
                    "persona_samples": len(persona), "control_samples": len(control), "questions": len(questions)}
    for name in names:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(load_model().model, adapters / name).eval()
        diff = model_diff(base, tuned, tok, sae, prompts, answers, vectors={"optimistic": vec}, top=10)
        hits = [r["latent"] for r in diff.increased if abs(r["cosines"]["optimistic"]) >= 0.3]
        row = {"baseline_cosine": diff.baseline_cosines["optimistic"],
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
                                           questions[:8], vec, sae.layer, args.coef * diff.residual_norm, judge=judge)
        result[name] = row
        print(name, json.dumps(row, indent=2), flush=True)
    out = Path(args.out or Path(args.sae) / f"diff_lora{'_' + args.only if args.only else ''}.json")
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
