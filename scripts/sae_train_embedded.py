"""An SAE on the embedded model at the optimistic vector's layer, on >= 1M tokens, and a second seed.

Corpus: the model's own answers (the extraction rollouts given with --rollouts, both polarities, plus its answers
to the shipped neutral questions) and local text files (default: Vim's user manual and Node.js's API docs, prose
that ships with this machine). Writes the SAE to --out (SAELens format) and --out/seed1, and prints explained
variance, L0, dead fraction, loss increase, the seconds of each stage and how many of seed 0's latents have a
seed-1 match. Every stage resumes (rerun the same command after an interruption).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/sae_train_embedded.py --vectors runs/optimistic \
        --rollouts runs/optimistic --out runs/sae_embedded --tokens 1000000
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from steerlib.core.loading import load_vectors
from steerlib.core.sae_format import load_sae
from steerlib.sae.cache import ActivationCache
from steerlib.sae.quality import reconstruction_quality
from steerlib.sae.run import train_run
from steerlib.sae.train import SaeTrainConfig, split_rows, train_sae

DEFAULT_TEXT = sorted(glob.glob("/usr/share/vim/vim90/doc/usr_*.txt")) + sorted(
    glob.glob("/usr/share/doc/nodejs/api/*.md"))


def matches(a, b, threshold: float = 0.9) -> tuple[float, list[float]]:
    """Share of a's latents whose best decoder cosine in b is >= threshold, and each latent's best cosine."""
    best = []
    ub = b.unit_decoder()
    for start in range(0, a.d_sae, 1024):
        best += (a.unit_decoder()[start : start + 1024] @ ub.T).max(dim=1).values.tolist()
    return sum(x >= threshold for x in best) / len(best), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", required=True, help="trait vectors whose recommended layer the SAE reads")
    ap.add_argument("--rollouts", nargs="*", default=[])
    ap.add_argument("--text", nargs="*", default=None)
    ap.add_argument("--out", default="runs/sae_embedded")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--layer", type=int, default=None)
    args = ap.parse_args()
    tv = load_vectors(args.vectors)
    layer = args.layer or tv.recommended_layer
    cfg = SaeTrainConfig(expansion=args.expansion, k=args.k)
    text = DEFAULT_TEXT if args.text is None else args.text
    _, quality, times = train_run(args.out, layer, rollouts=args.rollouts, text_files=text, cfg=cfg,
                                  max_tokens=args.tokens)
    print(json.dumps({"layer": layer, **asdict(quality), "loss_increase": quality.loss_increase,
                      "seconds": times}, indent=2))
    cache = ActivationCache(Path(args.out) / "cache")
    t = time.perf_counter()
    second = train_sae(cache, Path(args.out) / "seed1", SaeTrainConfig(expansion=args.expansion, k=args.k, seed=1))
    t_second = time.perf_counter() - t
    first = load_sae(args.out)
    share, best = matches(first, second)
    _, held = split_rows(cache.n_tokens, cfg)
    q2 = reconstruction_quality(second, cache, held)
    vec = tv.get(layer)
    cos0 = first.unit_decoder() @ (vec / vec.norm())
    top = cos0.abs().argsort(descending=True)[:10].tolist()
    result = {"layer": layer, "cached_tokens": cache.n_tokens, "seed0": {**asdict(quality),
              "loss_increase": quality.loss_increase}, "seed1": asdict(q2), "seed1_train_s": t_second,
              "share_of_latents_matched_at_0.9": share,
              "top10_vector_latents_matched_at_0.9": sum(best[i] >= 0.9 for i in top),
              "top10_vector_latents_best_seed1_cosine": [round(best[i], 3) for i in top], "seconds": times,
              "torch_threads": torch.get_num_threads()}
    (Path(args.out) / "seeds.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
