"""Import time of the package face and of the kernels, each in a fresh interpreter, for one or more checkouts.

For every source tree given with ``--tree`` (default: the steerlib this interpreter imports), it runs
``import steerlib`` and ``import steerlib.kernels`` in new subprocesses, ``--runs`` times each, interleaved
(tree A face, tree B face, tree A kernels, ... then again) so that a busy machine slows every variant alike.
It prints the median and range of the time spent in the import statement itself (interpreter start-up is
the same for all and left out), the number of steerlib modules loaded and which heavy packages came with it.

A tree is put first on ``PYTHONPATH``. ``steerlib.kernels`` lives in the top-level ``kernels/`` folder and is
found through the editable install's path mapping, which points at one checkout only: to time another
checkout's kernels, link them into its package first (``ln -s ../kernels <tree>/steerlib/kernels``). The
``kernels from`` column says which folder each run actually imported, so a mix-up shows.

Usage::

    git worktree add --detach /tmp/base main && ln -s ../kernels /tmp/base/steerlib/kernels
    python scripts/bench_import.py --tree /tmp/base --tree .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("torch", "transformers", "sklearn", "peft", "triton", "matplotlib")
"""Packages whose presence after an import is reported (each costs 0.5-3 s to import)."""

CHILD = """
import json, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
import steerlib
kernels = sys.modules.get("steerlib.kernels")
print(json.dumps({{
    "seconds": seconds,
    "steerlib_modules": sorted(m for m in sys.modules if m.startswith("steerlib")),
    "heavy": [m for m in {heavy!r} if m in sys.modules],
    "face": steerlib.__file__,
    "kernels": getattr(kernels, "__file__", None),
}}))
"""


def time_import(tree: Path | None, module: str) -> dict:
    """Import ``module`` in a fresh interpreter with ``tree`` first on the path; the child's JSON report."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    code = CHILD.format(module=module, heavy=HEAVY)
    # A neutral working directory: the current one would otherwise shadow the tree on sys.path.
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"import {module} failed for {tree or 'the installed steerlib'}: {done.stderr[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable); default: installed")
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per tree and module (default 5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    trees: list[Path | None] = [t.resolve() for t in args.tree] if args.tree else [None]
    for tree in trees:
        if tree is not None and not (tree / "steerlib" / "__init__.py").is_file():
            parser.error(f"{tree} has no steerlib/__init__.py")
    modules = ("steerlib", "steerlib.kernels")
    results: dict[tuple[str, str], list[dict]] = {(str(t), m): [] for t in trees for m in modules}
    for _ in range(args.runs):
        for module in modules:
            for tree in trees:
                results[(str(tree), module)].append(time_import(tree, module))
    print(f"{'tree':40} {'import':18} {'median s':>9} {'min-max s':>13} {'steerlib mods':>13}  heavy loaded; kernels from")
    for (tree, module), runs in results.items():
        secs = [r["seconds"] for r in runs]
        last = runs[-1]
        print(f"{tree[-40:]:40} {module:18} {statistics.median(secs):9.2f} {min(secs):6.2f}-{max(secs):<6.2f} "
              f"{len(last['steerlib_modules']):13d}  {','.join(last['heavy']) or '-'}; "
              f"{Path(last['kernels']).parent if last['kernels'] else '-'}")


if __name__ == "__main__":
    main()
