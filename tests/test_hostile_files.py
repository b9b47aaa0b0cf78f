"""Hostile and damaged vector files (issue 21, classes 4-6): every one fails with one line naming the file.

Each row of the table writes one file, loads it with ``load_vectors`` (no model, so nothing bounds the sizes but
the loader itself) and expects a ``ValueError`` whose single line names the file and matches the row's pattern.
Rows cover: sizes read from a file that would decide an allocation (class 4), files that used to end in a
traceback (class 5) and non-finite values (class 6). The same files through ``steerlib export`` end with exit 2
and one ``error:`` line.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerlib.cli import main
from steerlib.core.loading import load_vectors, resolve_vector
from steerlib.core.vectors import TraitVectors, check_vector

WIDTH = 8


def _gguf(path: Path, directions: dict[str, np.ndarray], **meta) -> Path:
    writer = gguf.GGUFWriter(str(path), "controlvector")
    for key, value in meta.items():
        name = key.replace("__", ".")
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        elif value >= 2**31:
            writer.add_uint64(name, value)
        else:
            writer.add_int32(name, value)
    for name, vec in directions.items():
        writer.add_tensor(name, vec.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _ones(inf_at: int | None = None, value: float = np.inf) -> np.ndarray:
    vec = np.ones(WIDTH, np.float32)
    if inf_at is not None:
        vec[inf_at] = value
    return vec


def _header(n_tensors: int, n_keys: int, version: int = 3, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys) + tail


def _kv_array(count: int) -> bytes:
    """One metadata key holding a uint8 array that claims ``count`` elements (none follow)."""
    key = b"k"
    return struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, count)


def _raw(data: bytes, suffix: str = ".gguf") -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        path = root / f"f{suffix}"
        path.write_bytes(data)
        return path
    return write


def _saklas(tensors: dict[str, torch.Tensor], sidecar: object = None) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        path = root / "profile.safetensors"
        save_file(tensors, str(path))
        if sidecar is not None:
            path.with_suffix(".json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
        return path
    return write


def _steerlib_folder(table: torch.Tensor, meta: object = None) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        folder = root / "run"
        TraitVectors({"response_mean": table}, "m", "t").save(folder)
        if meta is not None:
            (folder / "vectors.json").write_text(json.dumps(meta))
        return folder
    return write


def _pt(obj: object) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        path = root / "table_response_avg_diff.pt"
        torch.save(obj, path)
        return path
    return write


def _with_nan(rows: int, bad_row: int, value: float = float("nan")) -> torch.Tensor:
    table = torch.ones(rows, WIDTH)
    table[bad_row, 2] = value
    return table


def _safetensors_header_only(root: Path) -> Path:
    path = root / "vectors.safetensors"
    header = json.dumps({"response_mean": {"dtype": "F32", "shape": [4, WIDTH], "data_offsets": [0, 128]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _safetensors_truncated(root: Path) -> Path:
    path = root / "vectors.safetensors"
    save_file({"response_mean": torch.ones(4, WIDTH)}, str(path))
    path.write_bytes(path.read_bytes()[:-20])
    return path


CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    # class 4: a size read from the file must be bounded before anything is allocated from it
    ("gguf n_layers 2e9", lambda r: _gguf(r / "f.gguf", {"direction.4": _ones()}, steerlib__n_layers=2_000_000_000),
     r"steerlib\.n_layers is 2000000000, outside 1\.\.4096"),
    ("gguf n_layers 2^40", lambda r: _gguf(r / "f.gguf", {"direction.4": _ones()}, steerlib__n_layers=2**40),
     r"steerlib\.n_layers is 1099511627776, outside"),
    ("gguf direction.4000000000", lambda r: _gguf(r / "f.gguf", {"direction.4000000000": _ones()}),
     r"layer index of direction\.4000000000 is 4000000000, outside 0\.\.4095"),
    ("gguf header 2^40 tensors", _raw(_header(2**40, 0)), r"tensor count is 1099511627776, outside 0\.\.65536"),
    ("gguf header 2^40 keys", _raw(_header(0, 2**40)), r"metadata key count is 1099511627776, outside 0\.\.65536"),
    ("gguf array of 2^40 elements", _raw(_header(0, 1, tail=_kv_array(2**40))),
     r"k array length is 1099511627776, outside"),
    ("gguf array longer than the file", _raw(_header(0, 1, tail=_kv_array(5000))),
     r"k array length is 5000 but only 0 bytes follow"),
    ("saklas layer_20000000", _saklas({"layer_20000000": torch.ones(WIDTH)}),
     r"layer index of layer_20000000 is 20000000, outside 0\.\.4095"),
    ("paper .pt with 10^5 rows", _pt(torch.ones(100_000, 2)), r"row count - 1 \(blocks\) is 99999, outside 0\.\.4096"),
    # class 5: damaged files end in one line, not a traceback
    ("gguf of 24 bytes", _raw(_header(1, 1)), r"tensor count is 1 but only 8 bytes follow: the file is truncated"),
    ("gguf of 3 bytes", _raw(b"GGU"), r"not a GGUF file"),
    ("gguf version 1", _raw(_header(0, 0, version=1)), r"GGUF version 1 is not supported"),
    ("gguf trait as a number", lambda r: _gguf(r / "f.gguf", {"direction.4": _ones()}, steerlib__trait=7),
     r"metadata steerlib\.trait must be a string, got int"),
    ("safetensors empty", _raw(b"", ".safetensors"), r"the file is empty"),
    ("safetensors 5 bytes", _raw(b"\x01\x02\x03\x04\x05", ".safetensors"), r"shorter than its 8-byte header"),
    ("safetensors header length 2^62", _raw(struct.pack("<Q", 2**62) + b"{}", ".safetensors"),
     r"header length field says 4611686018427387904 bytes but the file has 2"),
    ("safetensors header only", _safetensors_header_only, r"not a readable safetensors file"),
    ("safetensors truncated data", _safetensors_truncated, r"not a readable safetensors file"),
    ("saklas sidecar provenance list", _saklas({"layer_2": torch.ones(WIDTH)}, {"provenance": [1, 2]}),
     r"profile\.json: provenance must be a JSON object, got list"),
    ("saklas sidecar a list", _saklas({"layer_2": torch.ones(WIDTH)}, [1]),
     r"profile\.json: a saklas sidecar must be a JSON object, got list"),
    ("saklas sidecar bad JSON", _saklas({"layer_2": torch.ones(WIDTH)}, "{"), r"profile\.json line 1: invalid JSON"),
    ("saklas concept a number", _saklas({"layer_2": torch.ones(WIDTH)}, {"provenance": {"concept": 3}}),
     r"provenance\.concept must be a string, got int"),
    ("saklas integer tensor", _saklas({"layer_2": torch.ones(WIDTH, dtype=torch.int32)}),
     r"tensor 'layer_2' must hold real floating-point values"),
    ("steerlib meta trait a list", _steerlib_folder(torch.ones(4, WIDTH), {"trait": ["x"]}),
     r"trait must be a string, got list"),
    ("steerlib recommended layer 1e9", _steerlib_folder(torch.ones(4, WIDTH), {"recommended_layer": 10**9}),
     r"recommended_layer 1000000000 is outside the vectors' layers 0\.\.3"),
    ("steerlib recommended layer 2.5", _steerlib_folder(torch.ones(4, WIDTH), {"recommended_layer": 2.5}),
     r"recommended_layer must be an integer layer, got 2\.5"),
    ("pt meta device", _pt(torch.ones(4, WIDTH, device="meta")), r"is on the meta device"),
    # class 6: non-finite values are refused at load, naming the file and the layer
    ("gguf inf", lambda r: _gguf(r / "f.gguf", {"direction.4": _ones(3)}),
     r"direction\.4 \(steerlib layer 5\) contains NaN or inf values"),
    ("gguf nan", lambda r: _gguf(r / "f.gguf", {"direction.2": _ones(0, np.nan)}),
     r"direction\.2 \(steerlib layer 3\) contains NaN or inf values"),
    ("saklas nan", _saklas({"layer_1": torch.ones(WIDTH), "layer_5": torch.full((WIDTH,), float("nan"))}),
     r"layer_5 \(steerlib layer 6\) contains NaN or inf values"),
    ("steerlib inf at layer 3", _steerlib_folder(_with_nan(5, 3, float("inf"))),
     r"tensor 'response_mean' contains NaN or inf values at layer 3"),
    ("paper .pt nan at row 2", _pt(_with_nan(4, 2)), r"contains NaN or inf values at layer 2"),
]


@pytest.mark.parametrize(("name", "write", "pattern"), CASES, ids=[c[0].replace(" ", "-") for c in CASES])
def test_hostile_file_fails_in_one_line(name, write, pattern, tmp_path):
    path = write(tmp_path)
    with pytest.raises(ValueError) as info:
        load_vectors(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message or str(path.with_suffix(".json")) in message, message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("name", ["gguf header 2^40 tensors", "safetensors header length 2^62", "gguf inf",
                                  "saklas sidecar provenance list"])
def test_hostile_file_cli_is_one_error_line(name, tmp_path, monkeypatch, capsys):
    write, pattern = next((w, p) for n, w, p in CASES if n == name)
    path = write(tmp_path)
    monkeypatch.setattr(sys, "argv", ["steerlib", "export", str(path), "--out", str(tmp_path / "out.gguf")])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out.gguf").exists()  # nothing non-finite or half-read was written out


def test_good_files_still_load(tmp_path):
    """The bounds are far from real files: a deep, wide, clean control vector and saklas profile load."""
    gg = _gguf(tmp_path / "deep.gguf", {"direction.120": _ones(), "direction.2": _ones()}, steerlib__n_layers=128)
    tv = load_vectors(gg)
    assert tv.n_positions == 129 and torch.equal(tv.get(121), torch.ones(WIDTH))
    prof = _saklas({"layer_3": torch.full((WIDTH,), 2.0)}, {"provenance": {"concept": "calm"}})(tmp_path)
    tv = load_vectors(prof)
    assert tv.trait == "calm" and torch.equal(tv.get(4), torch.full((WIDTH,), 2.0))


def test_meta_device_vector_is_refused_as_an_object():
    with pytest.raises(ValueError, match=r"^vector is on the meta device"):
        check_vector(torch.ones(WIDTH, device="meta"))
    with pytest.raises(ValueError, match=r"^trait vectors is on the meta device"):
        load_vectors(torch.ones(4, WIDTH, device="meta"))
    with pytest.raises(ValueError, match=r"on the meta device"):
        resolve_vector(torch.ones(WIDTH, device="meta"), 2)
