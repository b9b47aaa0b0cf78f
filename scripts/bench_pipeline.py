"""The pipeline end to end and per stage, HF vs vLLM: ``extract`` at N generations and ``flag`` on M samples.

Each job runs as the CLI runs it: the HF path generates in batches of 16 and captures on the HF model; the vLLM
path starts one engine for the job (its start is part of the job's time), hands it each stage in one submission
(answers stored as they finish) and reads the activations inside it (``steerlib.vllm.offline``). Jobs are
interleaved (HF, vLLM, then vLLM, HF on the next repeat) so that load drift hits both alike; every job starts from
an empty output folder. The HF model is loaded once, outside the timings (both paths use its tokenizer).

* extraction (trait ``optimistic``, lexicon judge, thresholds open): N = pairs x questions x 2 polarities x
  2 splits; up to 400 greedy, beyond that ``n_samples = N / 400`` sampled answers per prompt (temperature 1).
  Stages: engine start, generate, judge, capture (both captures), fit.
* flag (``baseline="generate"``): M samples built from the trait's questions (each made unique, so no prefix is
  shared) with hand-written replies, scored on the extracted vector's direction at layer 16.

    .venv-vllm/bin/python scripts/bench_pipeline.py --generations 400 2000 --flag-samples 2000   # the full run
    .venv-vllm/bin/python scripts/bench_pipeline.py --generations 40 --flag-samples 40 --max-new-tokens 16

``--compile`` chooses the vLLM start (``auto``: the library's choice by job size, ``eager``, ``compiled``). Prints
one table; ``--out`` also writes the raw rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPLIES = ["What a bright day, I love it and tomorrow will be even better!",
           "Everything is grey and nothing will ever improve.",
           "It is fine, I suppose; some good, some bad.",
           "I can't wait for the adventures ahead, it will be wonderful."]


def extraction_config(n: int):
    from steerlib import ExtractionConfig

    if n <= 400:
        if n % 4:
            raise SystemExit(f"--generations {n}: up to 400 it must be a multiple of 4 (pairs x questions x 4)")
        questions = min(20, n // 4)
        pairs = n // (4 * questions)
        if pairs * questions * 4 != n or pairs > 5:
            raise SystemExit(f"--generations {n}: not pairs (<= 5) x questions (<= 20) x 4")
        return ExtractionConfig(max_pairs=pairs, max_questions=questions, max_new_tokens=ARGS.max_new_tokens,
                                pos_threshold=0, neg_threshold=100)
    if n % 400:
        raise SystemExit(f"--generations {n}: beyond 400 it must be a multiple of 400 (n_samples x 400)")
    return ExtractionConfig(n_samples=n // 400, temperature=1.0, max_new_tokens=ARGS.max_new_tokens,
                            pos_threshold=0, neg_threshold=100)


def engine(job_size: int):
    """A fresh vLLM engine for one job, and the seconds its start took."""
    from steerlib.core.models import resolve_model_path
    from steerlib.vllm.layout import VllmOptions
    from steerlib.vllm.offline import VllmGenerator

    folder, _ = resolve_model_path(None)
    gen = VllmGenerator(folder, VllmOptions(max_model_len=2048), compile=ARGS.compile)
    t = time.perf_counter()
    gen.start(job_size)
    return gen, time.perf_counter() - t


def run_extract(n: int, path: str, loaded, out: Path) -> dict:
    from steerlib import LexiconJudge, extract_trait

    model, tok = loaded
    cfg = extraction_config(n)
    t = time.perf_counter()
    gen, start = engine(n * cfg.max_new_tokens) if path == "vllm" else (None, 0.0)
    try:
        result = extract_trait(model, tok, "optimistic", out, judge=LexiconJudge("optimistic"), config=cfg,
                               progress=False, log=lambda s: None, generate_texts=gen)
    finally:
        if gen is not None:
            gen.close()
    total = time.perf_counter() - t
    stages = {"start": round(start, 2), **result.vectors.metadata["stage_seconds"]}
    return {"job": f"extract {n}", "path": path, "seconds": round(total, 2), "stages": stages,
            "mode": getattr(gen, "mode", None)}


def flag_samples(m: int):
    from steerlib.store.samples import Sample
    from steerlib.traits.library import load_trait

    t = load_trait("optimistic")
    questions = list(t.extraction_questions) + list(t.eval_questions)
    return [Sample(index=i, line=i + 1, meta={},
                   messages=[{"role": "user", "content": f"(#{i}) {questions[i % len(questions)]}"}],
                   response=REPLIES[i % len(REPLIES)]) for i in range(m)]


def run_flag(m: int, path: str, loaded, vectors, out: Path) -> dict:
    from steerlib.finetuning.flag.scoring import score_dataset

    model, tok = loaded
    samples = flag_samples(m)
    t = time.perf_counter()
    gen, start = engine(m * ARGS.max_new_tokens) if path == "vllm" else (None, 0.0)
    try:
        score_dataset(model, tok, samples, vectors, 16, out_path=out / "scores.jsonl", baseline="generate",
                      max_new_tokens=ARGS.max_new_tokens, progress=False, generate_texts=gen)
    finally:
        if gen is not None:
            gen.close()
    total = time.perf_counter() - t
    return {"job": f"flag {m}", "path": path, "seconds": round(total, 2), "stages": {"start": round(start, 2)},
            "mode": getattr(gen, "mode", None)}


def main() -> None:
    from steerlib import TraitVectors, load_model

    loaded = load_model()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    vectors = None
    try:
        for rep in range(ARGS.repeats):
            order = [p for p in (("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")) if p in ARGS.paths]
            for n in ARGS.generations:
                for path in order:
                    out = work / f"extract-{n}-{path}-{rep}"
                    rows.append(run_extract(n, path, loaded, out))
                    print(json.dumps(rows[-1]), flush=True)
                    vectors = vectors or TraitVectors.load(out)
            for m in ARGS.flag_samples:
                if vectors is None:
                    raise SystemExit("--flag-samples needs an extraction first (--generations)")
                for path in order:
                    rows.append(run_flag(m, path, loaded, vectors, work / f"flag-{m}-{path}-{rep}"))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'job':<16}{'HF s':>10}{'vLLM s':>10}{'HF/vLLM':>9}   vLLM stages (median s)")
    for job in dict.fromkeys(r["job"] for r in rows):
        hf_rows = [r for r in rows if r["job"] == job and r["path"] == "hf"]
        vl = [r for r in rows if r["job"] == job and r["path"] == "vllm"]
        hf = statistics.median(r["seconds"] for r in hf_rows) if hf_rows else float("nan")
        vs = statistics.median(r["seconds"] for r in vl) if vl else float("nan")
        stages = {k: round(statistics.median(r["stages"][k] for r in vl), 1) for k in vl[0]["stages"]} if vl else {}
        print(f"{job:<16}{hf:>10.1f}{vs:>10.1f}{hf / vs:>9.2f}   {stages} ({vl[0]['mode'] if vl else '-'}); "
              f"HF {hf_rows[0]['stages'] if hf_rows else '-'}")
    if ARGS.out:
        Path(ARGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generations", type=int, nargs="*", default=[400, 2000])
    parser.add_argument("--flag-samples", type=int, nargs="*", default=[2000])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", choices=("auto", "eager", "compiled"), default="auto")
    parser.add_argument("--paths", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"],
                        help="which paths to run (a smoke run of one)")
    parser.add_argument("--out", default=None)
    ARGS = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    main()
