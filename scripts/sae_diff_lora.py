"""Model diffing on fine-tunes the project makes itself: context distillation of the optimistic persona.

Trains two LoRAs on the embedded model, the same way (same rank, modules, steps, learning rate, data size):
"persona" on positive-persona answers with the system prompt removed (context distillation: the model learns to
answer optimistically unprompted) and "control" on its own answers to the second half of the shipped neutral
questions. The training answers are generated here (stage "data", resumable, refused under other settings): the
persona set asks every question of the trait (both splits) under every positive instruction of the trait; the
control set samples the model's own unprompted answers to the control questions until it has as many answers.
Each LoRA is diffed against the base model through the SAE on identical teacher-forced text: the first half of the
neutral questions plus the base model's own answers (held out from both LoRAs). Reports the top-10 increased
latents with their decoder cosine to the optimistic vector, whether one with cosine >= 0.3 also appears in the
vector's top-20 decomposition, the SAE-free baseline's cosine (mean residual difference vs the vector), and a
steering screen of the top latents (trait projection and lexicon score) for both LoRAs.

The ranking is read both ways with the sign kept: a latent moves the residual along +vector when its activation
increases and its decoder cosine is >= 0.3, or when its activation decreases and its decoder cosine is <= -0.3
(its change -delta * d then has cosine >= 0.3 with the vector).

A stronger matched pair: ``--samples 2 --min-score 88 --train-size 200`` generates two persona answers per
(instruction, question), keeps the first 200 whose lexicon optimism is >= 88, and trains the control on 200 neutral
answers with the same steps, learning rate and rank (the control is not filtered: it is the model's own answers).

A persona stronger than the system prompt alone: ``--persona-steer 0.3`` generates the persona answers under the
positive system prompt and steered with the optimistic vector at its recommended layer (``add``, relative: 0.3 x
the layer's typical residual norm, as ``steerlib steer --relative``). The LoRA is still trained on the answers
without system prompt and without steering. The coefficient enters the persona's data and training settings only,
so the control's settings stay those of the earlier pairs and their control adapter is reused unchanged.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/sae_diff_lora.py --vectors runs/optimistic \
        --sae runs/sae_embedded --rollouts runs/optimistic --adapters runs/sae_loras2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from steerlib.core.chat import format_prompt
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.core.models import load_model
from steerlib.core.sae_format import load_sae
from steerlib.extraction.extract import load_responses
from steerlib.finetuning.training import lora_finetune
from steerlib.sae.decompose import decompose
from steerlib.sae.diff import model_diff
from steerlib.sae.screen import screen_latents
from steerlib.steering.calibration import reference_questions
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops
from steerlib.store.results import ResultsStore
from steerlib.store.samples import Sample
from steerlib.traits.judges import make_judge
from steerlib.traits.library import load_trait

MODULES = {"qv": ("q_proj", "v_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def _samples(pairs: list[tuple[str, str]]) -> list[Sample]:
    return [Sample(index=i, line=i + 1, messages=({"role": "user", "content": q},), response=a)
            for i, (q, a) in enumerate(pairs)]


def _answers(path: Path, jobs: list[dict], settings: dict, model, tok, judge, batch_size: int = 16,
             steering: list = ()) -> list[dict]:
    """Generate (and lexicon-score) an answer for each job {id, question, system}; appended per batch, resumable.

    ``steering`` (``SteerOp``s) steers the generation; the caller records it in ``settings``."""
    log = ResultsStore(path, {**settings, "n": len(jobs)})
    done = log.by_key("id")
    todo = [(i, j) for i, j in enumerate(jobs) if j["id"] not in done]
    for start in range(0, len(todo), batch_size):
        first = todo[start][0]  # the seed follows the job's position, so a resumed run samples the same answers
        chunk = [j for _, j in todo[start : start + batch_size]]
        prompts = [format_prompt(tok, j["question"], j["system"]) for j in chunk]
        texts = [g.text for g in generate(model, tok, prompts, max_new_tokens=settings["max_new_tokens"],
                                          temperature=settings["temperature"], seed=settings["seed"] + first,
                                          batch_size=batch_size, steering=steering)]
        scores = judge.score_many([(j["question"], t) for j, t in zip(chunk, texts, strict=True)])
        records = [{**j, "response": t, "score": s} for j, t, s in zip(chunk, texts, scores, strict=True)]
        log.append(records)
        done.update({r["id"]: r for r in records})
        print(f"{path.name}: {len(done)}/{len(jobs)} answers", flush=True)
    return [done[j["id"]] for j in jobs]


def _log_step(losses: list[float], step: int, loss: float) -> None:
    losses.append(loss)
    if step % 10 == 0:
        print(f"step {step}: loss {loss:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--rollouts", required=True, help="extraction run; its positive answers train the persona LoRA "
                                                      "when --persona-data rollouts")
    ap.add_argument("--persona-data", choices=("generate", "rollouts"), default="generate",
                    help="generate: every question x every positive instruction (here); rollouts: the run's answers")
    ap.add_argument("--samples", type=int, default=1, help="persona answers per (instruction, question)")
    ap.add_argument("--min-score", type=float, default=None,
                    help="keep only persona answers whose lexicon optimism is >= this (the control is not filtered)")
    ap.add_argument("--train-size", type=int, default=None,
                    help="answers per LoRA (persona: the first kept ones; control: this many); default all")
    ap.add_argument("--persona-steer", type=float, default=None, metavar="COEF",
                    help="also steer the persona answers with the vector at its recommended layer, COEF x the "
                         "layer's typical residual norm (the LoRA is trained unsteered, without system prompt)")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the generated answers")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--modules", choices=sorted(MODULES), default="qv")
    ap.add_argument("--screen", type=int, default=3)
    ap.add_argument("--screen-questions", type=int, default=8)
    ap.add_argument("--coef", type=float, default=0.5, help="screen: added norm / median residual norm")
    ap.add_argument("--questions", type=int, default=40,
                    help="the first N neutral questions are diffed, the rest train the control LoRA")
    ap.add_argument("--adapters", default="runs/sae_loras", help="where the two LoRA adapters and their data are kept")
    ap.add_argument("--train-only", action="store_true", help="train and save the adapters, then stop")
    ap.add_argument("--only", choices=("persona", "control"), default=None, help="train/diff one adapter only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.persona_steer is not None and args.persona_data != "generate":
        raise SystemExit("--persona-steer steers generated persona answers: it needs --persona-data generate")
    base, tok = load_model()
    # the base model's own greedy answers to the 80 neutral questions, written by sae_train_embedded.py
    neutral = [json.loads(line) for line in (Path(args.sae) / "corpus" / "neutral.jsonl").read_text().splitlines()]
    questions = reference_questions()
    half = min(args.questions, len(questions) // 2)
    prompts = [format_prompt(tok, q) for q in questions[:half]]  # diffed on these (held out from both LoRAs)
    answers = [n["response"] for n in neutral[:half]]
    adapters = Path(args.adapters)
    judge = make_judge("lexicon:optimistic", "optimistic")
    data_stats: dict = {}
    names = ("persona", "control") if args.only is None else (args.only,)
    if args.persona_data == "rollouts":
        persona = [(r["question"], r["response"]) for r in load_responses(args.rollouts) if r.get("polarity") == "pos"]
        control = [(q, n["response"]) for q, n in zip(questions[half:], neutral[half:], strict=True)]
    else:
        trait = load_trait("optimistic")
        settings = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": 0}
        trait_questions = list(trait.extraction_questions) + list(trait.eval_questions)
        # the sample index is the outer loop, so the first sample of every (instruction, question) sits at the same
        # position (and seed) whatever --samples is
        jobs = [{"id": f"p{p}-q{q}-s{s}", "question": question, "system": pair.positive}
                for s in range(args.samples) for p, pair in enumerate(trait.instruction_pairs)
                for q, question in enumerate(trait_questions)]
        rows: list[dict] = []
        if "persona" in names or args.train_size is None:  # the control alone needs no persona answers
            psettings, ops = settings, []
            if args.persona_steer is not None:  # absent key: earlier persona stores stay readable
                tv = load_vectors(args.vectors, base)
                layer = pick_layer(tv, None)
                ops = build_ops(base, tv, layer, args.persona_steer, relative=True)
                psettings = {**settings, "persona_steer": args.persona_steer, "steer_layer": layer}
            rows = _answers(adapters / "data" / "persona.jsonl", jobs, psettings, base, tok, judge, steering=ops)
            kept = [r for r in rows if args.min_score is None or (r["score"] or 0.0) >= args.min_score]
            if args.train_size is not None and len(kept) < args.train_size:
                raise SystemExit(f"only {len(kept)} of {len(rows)} persona answers score >= {args.min_score}; "
                                 "raise --samples or lower --min-score")
            rows = kept[: args.train_size]
        persona = [(r["question"], r["response"]) for r in rows]  # the system prompt is dropped: distillation
        n_control = args.train_size or len(persona)
        control_qs = questions[half:]
        per_q = -(-n_control // len(control_qs))
        cjobs = [{"id": f"q{q}-s{s}", "question": question, "system": None}
                 for s in range(per_q) for q, question in enumerate(control_qs)][:n_control]
        crows = _answers(adapters / "data" / "control.jsonl", cjobs, settings, base, tok, judge)
        control = [(r["question"], r["response"]) for r in crows]

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        data_stats = {"persona_mean_lexicon": mean([r["score"] for r in rows]),
                      "control_mean_lexicon": mean([r["score"] for r in crows]), "persona_candidates": len(jobs),
                      "min_score": args.min_score, "persona_steer": args.persona_steer, **settings}
        print("data", data_stats, flush=True)
    train = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "modules": args.modules,
             "persona_data": args.persona_data, "samples": args.samples}
    if args.min_score is not None or args.train_size is not None:  # absent keys keep earlier adapters readable
        train.update(min_score=args.min_score, train_size=args.train_size)
    # the steering coefficient is the persona's alone: the control's settings stay those of earlier pairs
    persona_train = train if args.persona_steer is None else {**train, "persona_steer": args.persona_steer}
    train_s = {}
    for name, pairs in (("persona", persona), ("control", control)):
        if name not in names:
            continue
        folder = adapters / name
        settings_of = {**(persona_train if name == "persona" else train), "n": len(pairs)}
        if (folder / "adapter_config.json").is_file():
            saved = folder / "steerlib_train.json"
            old = json.loads(saved.read_text()) if saved.is_file() else None
            if old is None or old.get("settings") != settings_of:
                raise SystemExit(f"{folder} was trained under other settings ({old and old.get('settings')}); "
                                 "use another --adapters folder")
            train_s[name] = old["train_s"]
            continue
        t = time.perf_counter()
        losses: list[float] = []
        tuned = lora_finetune(load_model().model, tok, _samples(pairs), steps=args.steps, lr=args.lr, r=args.rank,
                              alpha=2 * args.rank, target_modules=MODULES[args.modules],
                              on_step=lambda step, loss, acc=losses: _log_step(acc, step, loss)).model
        tuned.save_pretrained(folder)
        train_s[name] = time.perf_counter() - t
        (folder / "steerlib_train.json").write_text(json.dumps(
            {"settings": settings_of, "train_s": train_s[name], "losses": losses}, indent=1))
        print(f"trained {name} LoRA in {train_s[name]:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
    if args.train_only:
        return
    sae = load_sae(args.sae)
    tv = load_vectors(args.vectors, base)
    vec = tv.get(sae.layer)
    decomposed = decompose(vec, sae, top=20).latents
    decomposition = [r["latent"] for r in decomposed]
    result: dict = {"layer": sae.layer, **train, "persona_steer": args.persona_steer, "train_s": train_s, "data": data_stats,
                    "persona_samples": len(persona), "control_samples": len(control), "questions": len(questions),
                    "decomposition_top20": decomposition}
    for name in names:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(load_model().model, adapters / name).eval()
        # every latent ranked (top = the width), so the vector's own latents can be placed in the ranking
        full = model_diff(base, tuned, tok, sae, prompts, answers, vectors={"optimistic": vec}, top=sae.d_sae)
        diff = replace(full, increased=full.increased[:10], decreased=full.decreased[:10])
        rank_up = {r["latent"]: i + 1 for i, r in enumerate(full.increased)}
        change = {r["latent"]: r["diff"] for r in full.increased}
        # signed: the change moves the residual along +vector (see the module docstring)
        hits = ([r["latent"] for r in diff.increased if r["cosines"]["optimistic"] >= 0.3]
                + [r["latent"] for r in diff.decreased if r["cosines"]["optimistic"] <= -0.3])
        against = ([r["latent"] for r in diff.increased if r["cosines"]["optimistic"] <= -0.3]
                   + [r["latent"] for r in diff.decreased if r["cosines"]["optimistic"] >= 0.3])
        row = {"baseline_cosine": diff.baseline_cosines["optimistic"],
               "baseline_norm": diff.baseline_norm, "residual_norm": diff.residual_norm,
               "top10_increased": [(r["latent"], round(r["diff"], 4), round(r["cosines"]["optimistic"], 3))
                                   for r in diff.increased],
               "top10_decreased": [(r["latent"], round(r["diff"], 4), round(r["cosines"]["optimistic"], 3))
                                   for r in diff.decreased],
               "latents_along_vector_cos_ge_0.3": hits, "latents_against_vector_cos_ge_0.3": against,
               "of_them_in_decomposition_top20": [i for i in hits if i in decomposition],
               # the vector's top-10 latents: (latent, decoder cosine, activation change, rank by increase, rank by
               # decrease); a change of the cosine's sign moves the residual along +vector
               "decomposition_top10_in_diff": [
                   (r["latent"], round(r["cosine"], 3), round(change[r["latent"]], 4), rank_up[r["latent"]],
                    sae.d_sae + 1 - rank_up[r["latent"]]) for r in decomposed[:10]]}
        print(name, json.dumps(row, indent=2), flush=True)
        if args.screen > 0:
            t = time.perf_counter()
            row["screen"] = screen_latents(base, tok, Path(args.sae), [r["latent"] for r in diff.increased[: args.screen]],
                                           questions[: args.screen_questions], vec, sae.layer,
                                           args.coef * diff.residual_norm, judge=judge)
            row["screen_s"] = time.perf_counter() - t
            print(name, "screen", json.dumps(row["screen"], indent=1), flush=True)
        result[name] = row
    out = Path(args.out or Path(args.sae) / f"diff_lora{'_' + args.only if args.only else ''}.json")
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
