"""Throughput of ``capture_activations`` on the embedded model, per backend and layer selection.

Reports tokens/s = real (unpadded) tokens captured / wall time, after one warm-up batch per backend (which
also builds the TransformerLens / nnsight wrappers).

    python scripts/bench_capture.py --n 64 --batch 16 --backends torch transformer_lens nnsight
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

import torch

from steerlib.core.arch import get_layout
from steerlib.core.backends import BACKENDS
from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.models import load_model

_QUESTIONS = [
    "How do you feel about the future of your city?",
    "What is the best way to learn a new language?",
    "Describe a rainy afternoon.",
    "Why do people enjoy music?",
    "Give me advice for a job interview tomorrow.",
    "What happens when you mix red and blue paint?",
]
_WORDS = ("the quick brown fox jumps over a lazy dog while bright clouds drift across an open sky and "
          "people talk about plans hopes worries and small daily things").split()


def make_samples(tokenizer, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` chat-formatted prompts with responses of 10-60 words (mixed lengths, as in extraction)."""
    rng = random.Random(seed)
    prompts = [format_prompt(tokenizer, _QUESTIONS[i % len(_QUESTIONS)]) for i in range(n)]
    responses = [" ".join(rng.choices(_WORDS, k=rng.randint(10, 60))) for _ in range(n)]
    return prompts, responses


def real_tokens(tokenizer, prompts: list[str], responses: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in [*prompts, *responses])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="samples per measurement")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the best is reported")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(device=args.device)
    device = next(model.parameters()).device
    n_layers = get_layout(model).n_layers
    prompts, responses = make_samples(tokenizer, args.n)
    total = real_tokens(tokenizer, prompts, responses)
    selections = {"all": None, f"layer {n_layers // 2}": [n_layers // 2]}
    print(f"model: SmolLM2-135M-Instruct, device {device}, torch threads {torch.get_num_threads()}, "
          f"{args.n} samples, {total} real tokens, batch {args.batch}")
    print(f"{'backend':<18}{'layers':<10}{'seconds':>9}{'tokens/s':>11}")
    for backend in args.backends:
        warm = args.batch
        capture_activations(model, tokenizer, prompts[:warm], responses[:warm], None, backend=backend,
                            batch_size=args.batch)
        for label, layers in selections.items():
            best = float("inf")
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                capture_activations(model, tokenizer, prompts, responses, layers, backend=backend,
                                    batch_size=args.batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            print(f"{backend:<18}{label:<10}{best:>9.2f}{total / best:>11.0f}")


if __name__ == "__main__":
    main()
