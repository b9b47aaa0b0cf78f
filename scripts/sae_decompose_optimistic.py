"""The optimistic vector seen through the embedded model's SAE, next to the plain vector on the same data.

1. Decomposition: top latents by decoder cosine against the random-vector null, share rebuilt from the top k.
2. Held-out detection: AUROC of positive vs negative eval-split answers (not used to extract the vector) for each
   top latent's mean activation over the answer's tokens, beside the raw vector's response-mean projection AUROC.
3. Steering: the unit trait vector, the norm-matched sum of the top-k latents (signed by their cosine) and the
   sum of k random latents, each added at the same norm (--coef x the typical residual norm): mean lexicon trait
   score (0-100) and perplexity of the answers under the unsteered model.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/sae_decompose_optimistic.py --vectors runs/optimistic \
        --sae runs/sae_embedded --rollouts runs/optimistic
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.loading import load_vectors
from steerlib.core.models import load_model
from steerlib.core.sae_format import load_sae
from steerlib.extraction.extract import load_responses
from steerlib.sae.corpus import Sample
from steerlib.sae.decompose import decompose
from steerlib.sae.quality import lm_loss
from steerlib.steering.calibration import reference_questions
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops
from steerlib.traits.judges import make_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--rollouts", required=True, help="extraction run with an eval split")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--coef", type=float, default=0.5, help="added norm as a fraction of the typical residual norm")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model()
    sae = load_sae(args.sae)
    tv = load_vectors(args.vectors, model)
    layer = sae.layer
    vec = tv.get(layer)
    dec = decompose(vec, sae, top=10, model=model, tokenizer=tok)
    top = [r["latent"] for r in dec.latents]
    result: dict = {"layer": layer, "decomposition": dec.to_dict()}

    # 2. held-out AUROC
    records = [r for r in load_responses(args.rollouts) if r.get("split") == "eval"] or load_responses(args.rollouts)
    prompts = [format_prompt(tok, r["question"], r.get("system")) for r in records]
    labels = [r["polarity"] == "pos" for r in records]
    acts = capture_activations(model, tok, prompts, [r["response"] for r in records], [layer], keep_tokens=True)
    unit = vec / vec.norm()
    raw = (acts.at("response_mean", layer) @ unit).nan_to_num().tolist()
    per_answer = torch.stack([sae.encode(t[0, p:]).mean(0) if t.shape[1] > p else torch.zeros(sae.d_sae)
                              for t, p in zip(acts.tokens, acts.prompt_lengths, strict=True)])
    result["auroc"] = {"n_answers": len(records), "split": records[0].get("split"), "raw_vector": roc_auc_score(labels, raw),
                       "latents": {str(i): roc_auc_score(labels, per_answer[:, i].tolist()) for i in top}}

    # 3. steering: same added norm for every direction
    norm = float(acts.token_norms.median()) * args.coef
    signs = {r["latent"]: (1.0 if r["cosine"] >= 0 else -1.0) for r in dec.latents}
    topk = sum(signs[i] * sae.unit_decoder()[i] for i in top[: args.k])
    gen = torch.Generator().manual_seed(0)
    directions = {"unsteered": None, "vector": unit, f"top{args.k}_latents": topk / topk.norm()}
    for d in range(args.random_draws):
        ids = torch.randperm(sae.d_sae, generator=gen)[: args.k]
        rnd = sae.unit_decoder()[ids].sum(0)
        directions[f"random{args.k}_latents_{d}"] = rnd / rnd.norm()
    questions = reference_questions()[: args.questions]
    fmt = [format_prompt(tok, q) for q in questions]
    judge = make_judge("lexicon:optimistic", "optimistic")
    steering = {}
    for name, direction in directions.items():
        ops = [] if direction is None else build_ops(model, direction * norm, layers=layer, coef=1.0)
        texts = [g.text for g in generate(model, tok, fmt, steering=ops, max_new_tokens=48)]
        scores = [s for s in judge.score_many(list(zip(questions, texts, strict=True))) if s is not None]
        ppl = math.exp(lm_loss(model, tok, [Sample(p, t) for p, t in zip(fmt, texts, strict=True)],
                               responses_only=True))
        steering[name] = {"trait_score": sum(scores) / len(scores), "perplexity": ppl, "example": texts[0]}
        print(name, steering[name], flush=True)
    result["steering"] = {"added_norm": norm, "k": args.k, **steering}
    out = Path(args.out or Path(args.sae) / "decompose_optimistic.json")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "decomposition"}, indent=2))
    print(json.dumps({"latents": dec.latents, "null": dec.null, "rebuilt": dec.rebuilt}, indent=2))


if __name__ == "__main__":
    main()
