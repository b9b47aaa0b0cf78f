"""Fuzz the vector loaders for a bounded time: every input must load or fail with the clean error type.

Seeds are valid files of each format ``load_vectors`` reads (llama.cpp control-vector GGUF, a steerlib
``.safetensors`` + ``.json`` pair, a saklas profile + sidecar, a Persona Vectors ``.pt`` table). Hypothesis mutates
them (byte flips, overwritten 8-byte integers with boundary values, truncation, insertion, random JSON sidecars)
and each input is loaded with no model, so nothing bounds its sizes but the loader. ``ValueError`` (and
``FileNotFoundError``) are the clean outcome; anything else, a hang past the per-input alarm, or a
``MemoryError`` under the address-space limit is a crash, printed with its input's format and first line.

Usage:
    python scripts/fuzz_loaders.py --seconds 120 [--crash-dir fuzz-crashes]

Prints the count of inputs tried per format, outcomes, and the crashes (exit 1 if any).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import signal
import struct
import tempfile
import time
import traceback
from pathlib import Path

import gguf
import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from steerlib.core.loading import load_vectors

FORMATS = ("gguf", "safetensors", "saklas", "pt")
BOUNDARY = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)


class Hang(Exception):
    """An input took longer than the per-input alarm."""


def _seeds(root: Path) -> dict[str, dict[str, bytes]]:
    """Valid files per format: file name -> bytes (the first name is the one loaded)."""
    gen = torch.Generator().manual_seed(0)
    seeds: dict[str, dict[str, bytes]] = {}
    path = root / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 2)
    writer.add_int32("steerlib.n_layers", 6)
    writer.add_string("steerlib.trait", "calm")
    writer.add_float32("steerlib.coef", 2.0)
    for i in (2, 5):
        writer.add_tensor(f"direction.{i}", np.ones(16, np.float32) * i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    seeds["gguf"] = {"v.gguf": path.read_bytes()}
    save_file({"response_mean": torch.randn(5, 16, generator=gen)}, str(root / "v.safetensors"))
    seeds["safetensors"] = {"v.safetensors": (root / "v.safetensors").read_bytes(),
                            "v.json": json.dumps({"model": "m", "trait": "t", "recommended_layer": 2}).encode()}
    save_file({"layer_1": torch.randn(16, generator=gen), "layer_3": torch.randn(16, generator=gen)},
              str(root / "p.safetensors"))
    seeds["saklas"] = {"p.safetensors": (root / "p.safetensors").read_bytes(),
                       "p.json": json.dumps({"provenance": {"concept": "calm", "model_id": "m"}}).encode()}
    torch.save(torch.randn(5, 16, generator=gen), root / "t_response_avg_diff.pt")
    seeds["pt"] = {"t_response_avg_diff.pt": (root / "t_response_avg_diff.pt").read_bytes()}
    return seeds


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        kind, pos, value = op
        pos %= len(buf)
        if kind == "flip":
            buf[pos] = value % 256
        elif kind == "u64":
            buf[pos:pos + 8] = struct.pack("<Q", BOUNDARY[value % len(BOUNDARY)])
        elif kind == "u32":
            buf[pos:pos + 4] = struct.pack("<I", BOUNDARY[value % len(BOUNDARY)] % 2**32)
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = bytes([value % 256]) * (1 + value % 64)
    return bytes(buf)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "u64", "u32", "cut", "insert"]), st.integers(0, 10**6),
                         st.integers(0, 2**16)), min_size=1, max_size=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget for the whole run")
    parser.add_argument("--alarm", type=int, default=10, help="seconds one input may take before it is a hang")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit (allocations beyond "
                                                                      "it are MemoryError crashes)")
    parser.add_argument("--crash-dir", type=Path, default=None, help="save crashing inputs here")
    args = parser.parse_args()

    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang(f"no answer within {args.alarm} s")))
    work = Path(tempfile.mkdtemp(prefix="fuzz_loaders_"))
    seeds = _seeds(work)
    tried: collections.Counter = collections.Counter()
    outcomes: collections.Counter = collections.Counter()
    crashes: list[tuple[str, str, dict[str, bytes]]] = []
    deadline = time.monotonic() + args.seconds

    def run_one(fmt: str, files: dict[str, bytes]) -> None:
        folder = work / f"case{sum(tried.values())}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        tried[fmt] += 1
        signal.alarm(args.alarm)
        try:
            load_vectors(folder / next(iter(files)))
            outcomes["loaded"] += 1
        except (ValueError, FileNotFoundError):
            outcomes["clean error"] += 1
        except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
            outcomes["crash"] += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            crashes.append((fmt, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                 f"({Path(where.filename).name}:{where.lineno})", files))
        finally:
            signal.alarm(0)
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fmt=st.sampled_from(FORMATS), ops=OPS, sidecar=st.one_of(st.none(), JSON), mutate_sidecar=st.booleans())
    def fuzz(fmt: str, ops: list[tuple], sidecar: object, mutate_sidecar: bool) -> None:
        if time.monotonic() > deadline:
            return
        files = dict(seeds[fmt])
        main_name = next(iter(files))
        if mutate_sidecar and len(files) > 1:
            side = next(n for n in files if n != main_name)
            files[side] = json.dumps(sidecar).encode() if sidecar is not None else _mutate(files[side], ops)
        else:
            files[main_name] = _mutate(files[main_name], ops)
        run_one(fmt, files)

    while time.monotonic() < deadline:
        fuzz()
    total = sum(tried.values())
    print(f"inputs tried: {total} ({', '.join(f'{f} {tried[f]}' for f in FORMATS)}) in {args.seconds:.0f} s")
    print(f"outcomes: {dict(outcomes)}")
    print(f"crashes other than the clean error type: {len(crashes)}")
    for fmt, line, _files in crashes[:20]:
        print(f"  [{fmt}] {line}")
    if crashes and args.crash_dir is not None:
        for i, (fmt, line, files) in enumerate(crashes):
            folder = args.crash_dir / f"{i:03d}-{fmt}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            (folder / "error.txt").write_text(line + "\n")
    raise SystemExit(1 if crashes else 0)


if __name__ == "__main__":
    main()
