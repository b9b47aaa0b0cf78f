"""Decode overhead of steering + monitoring on the embedded model (CPU or GPU).

Times ``model.generate`` for exactly N new tokens (min_new_tokens = max_new_tokens, greedy) without hooks and
with an add-steer + per-token monitor at one layer and at several layers, interleaving the variants so
drift in machine load hits them alike, and reports the median time ratio to the unsteered run.

    python scripts/bench_decode.py --batch 1 16 --new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from steerlib import build_monitor, build_ops, format_prompt, load_model
from steerlib.core.capture import pad_batch
from steerlib.steering.steer import ResidualEditor

QUESTIONS = ["What will the next ten years bring?", "How should I spend a rainy weekend?",
             "Describe your ideal city.", "What do you think of long train journeys?"]


def _time_generate(model, ids, mask, new_tokens: int, ops, monitor) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), ResidualEditor(model, ops, monitor):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()

    model, tok = load_model(args.model)
    d = model.config.hidden_size
    torch.manual_seed(0)
    vector = torch.randn(d, device=model.device) * 0.1
    n_layers = model.config.num_hidden_layers
    many = sorted({args.layer, n_layers // 4, n_layers // 2, 3 * n_layers // 4})
    variants = {
        "unsteered": ([], None),
        f"steer+monitor @{args.layer}": (build_ops(model, vector, args.layer, 4.0),
                                         build_monitor(model, {"t": vector}, [args.layer])),
        f"steer+monitor @{len(many)} layers": (build_ops(model, vector, many, 4.0),
                                                build_monitor(model, {"t": vector}, many)),
    }
    print(f"device {model.device}, threads {torch.get_num_threads()}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"{'batch':>5}  {'variant':28s} {'seconds':>8}  {'ratio':>6}")
    for batch in args.batch:
        prompts = [format_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        ids, mask, _, _ = pad_batch(encoded, tok.pad_token_id or 0, "left")
        ids, mask = ids.to(model.device), mask.to(model.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for ops, monitor in variants.values():  # warm-up
            _time_generate(model, ids, mask, 4, ops, monitor)
        for _ in range(args.repeats):
            for name, (ops, monitor) in variants.items():
                times[name].append(_time_generate(model, ids, mask, args.new_tokens, ops, monitor))
        base = statistics.median(times["unsteered"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{batch:5d}  {name:28s} {med:8.3f}  {med / base:6.3f}")


if __name__ == "__main__":
    main()
