"""llama.cpp control vectors (GGUF): export ``TraitVectors`` for ``llama-cli --control-vector`` and read such files.

The format, as llama.cpp's loader defines it (``common_control_vector_load_one`` in ``common/common.cpp``,
``llama_control_vector_apply`` in ``src/llama-adapter.cpp``, writer ``export_gguf`` in
``examples/cvector-generator``; repeng and saklas write the same layout):

- metadata ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's llama.cpp
  architecture name, e.g. ``"llama"``) and ``controlvector.layer_count`` (number of direction tensors);
- one 1-D float32 tensor ``direction.N`` of width ``n_embd`` per steered layer, ``N >= 1``. The loader rejects
  ``direction.0``, non-F32 and non-1-D tensors, and tensors of different widths; it adds tensors with the same
  ``N`` (times the ``--control-vector-scaled`` strength).
- llama.cpp adds ``direction.N`` to the output of block ``il = N`` (0-based: ``cvec.apply_to(cur, il)`` at the end
  of each layer loop, ``tensors[il]`` filled from ``direction.il``); block 0 never gets a tensor.

Layer mapping: steerlib layer ``L`` is the output of block ``L - 1`` (see ``steerlib.core.hooks``). So

    steerlib layer L  <->  direction.(L - 1),   for L = 2 .. n_layers

and steerlib layer 1 (output of block 0) cannot be expressed in this format (export refuses it); layer 0 (the
embeddings) is never steered. The last layer ``n_layers`` is, in both, the last block's output before the final
norm. The other writers agree: repeng computes ``directions[i]`` from ``hidden_states[i + 1]``, adds it to the output
of ``model.layers[i]`` and exports it as ``direction.i``; saklas hooks ``layers[i]`` and writes its profile key
``layer_i`` as ``direction.i`` (see ``steerlib.core.vector_imports``).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steerlib.core.limits import MAX_ENTRIES, MAX_LAYERS, check_size, check_table
from steerlib.core.vectors import TraitVectors

ARCH = "controlvector"
_KEY_HINT = f"{ARCH}.model_hint"
_KEY_COUNT = f"{ARCH}.layer_count"
# steerlib's own keys (llama.cpp ignores metadata it does not read), so a round trip keeps names and depth.
_KEY_TRAIT = "steerlib.trait"
_KEY_MODEL = "steerlib.model"
_KEY_KIND = "steerlib.kind"
_KEY_N_LAYERS = "steerlib.n_layers"
_KEY_COEF = "steerlib.coef"
_DIRECTION = re.compile(r"direction\.(\d+)")
# GGUF metadata value types with a fixed size (bytes); 8 = string, 9 = array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 20  # longest metadata string or name (tokenizer vocabularies are arrays of short strings)


class _Header:
    """A bounds-checked walk over a GGUF header, so no count in it can make the reader loop or allocate.

    ``gguf.GGUFReader`` trusts the counts it reads (an array claiming 2^40 elements past the end of the file is
    walked element by element, appending empty parts forever), so the header is walked here first: every count
    and length must fit in the bytes that remain.
    """

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0
        self.order = "<"

    def take(self, fmt: str, field: str):
        size = struct.calcsize(self.order + fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: the file ends inside the GGUF header (reading {field} at byte "
                             f"{self.pos} of {len(self.data)})")
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def count(self, field: str, item_bytes: int, maximum: int) -> int:
        """A count read from the file, bounded by ``maximum`` and by the bytes left for its items."""
        value = check_size(self.take("Q", field), field, self.path, maximum)
        left = len(self.data) - self.pos
        if value * item_bytes > left:
            raise ValueError(f"{self.path}: {field} is {value} but only {left} bytes follow: the file is truncated "
                             "or damaged")
        return value

    def string(self, field: str) -> bytes:
        length = self.count(f"{field} length", 1, MAX_STRING)
        self.pos += length
        return self.data[self.pos - length:self.pos]

    def value(self, vtype: int, field: str, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.take({1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_BYTES[vtype]], field)
        elif vtype == _STRING:
            self.string(field)
        elif vtype == _ARRAY and depth == 0:
            itype = self.take("I", f"{field} element type")
            item = _SCALAR_BYTES.get(itype, 8)  # a string or nested array takes at least its 8-byte length
            n = self.count(f"{field} array length", item, MAX_ENTRIES * 64)
            if itype in _SCALAR_BYTES:
                self.pos += n * item
            else:
                for _ in range(n):
                    self.value(itype, field, depth + 1)
        else:
            raise ValueError(f"{self.path}: metadata {field} has an unknown GGUF value type {vtype}")

    def walk(self) -> None:
        if self.data[:4] != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (no GGUF magic in the first 4 bytes)")
        self.pos = 4
        version = self.take("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = self.count("tensor count", 33, MAX_ENTRIES)  # a tensor entry takes >= 33 bytes
        n_keys = self.count("metadata key count", 13, MAX_ENTRIES)  # a key entry takes >= 13 bytes
        for _ in range(n_keys):
            key = self.string("metadata key").decode("utf-8", "replace")
            self.value(self.take("I", f"{key} type"), key)
        for _ in range(n_tensors):
            name = self.string("tensor name").decode("utf-8", "replace")
            n_dims = check_size(self.take("I", f"{name} dimension count"), f"{name} dimension count", self.path,
                                _MAX_DIMS, minimum=1)
            dims = [self.take("Q", f"{name} shape") for _ in range(n_dims)]
            elements = 1
            for d in dims:
                elements *= d
            # The largest tensor type takes 8 bytes per element; the data must fit in the file.
            check_size(elements, f"{name} element count", self.path, len(self.data))
            self.take("I", f"{name} type")
            self.take("Q", f"{name} offset")


def direction_index(layer: int) -> int:
    """The ``direction.N`` index that edits steerlib layer ``layer`` (N = layer - 1); layer must be >= 2."""
    if layer < 2:
        raise ValueError(
            f"layer {layer} cannot be written as a llama.cpp control vector: direction.N edits the output of block "
            f"N (steerlib layer N + 1) and llama.cpp never steers block 0, so layers run from 2 to n_layers"
        )
    return layer - 1


def export_gguf(
    vectors: TraitVectors,
    path: str | Path,
    *,
    layers: Sequence[int] | int | None = None,
    coef: float = 1.0,
    kind: str | None = None,
    model_hint: str = "llama",
    normalize: bool = False,
) -> Path:
    """Write ``coef * vectors[layer]`` for each layer as a llama.cpp control vector.

    Args:
        vectors: the trait vectors.
        path: output ``.gguf`` file.
        layers: steerlib layers (2..n_layers) to write; None = the recommended layer if the vectors have one,
            else every layer from 2 to n_layers. Negative values count from the end.
        coef: scale baked into the file (llama.cpp multiplies again by its own ``--control-vector-scaled``).
        kind: pooling kind (default: the vectors' default kind).
        model_hint: llama.cpp architecture name stored in ``controlvector.model_hint``.
        normalize: write unit vectors (times ``coef``) instead of the raw ones.

    Returns:
        The written path.
    """
    import gguf

    n_layers = vectors.n_positions - 1
    if layers is None:
        rec = vectors.recommended_layer
        chosen = [rec] if rec is not None else list(range(2, n_layers + 1))
    else:
        chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise ValueError("no layers selected for export")
    resolved = []
    for layer in chosen:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an int, got {layer!r}")
        full = layer + vectors.n_positions if layer < 0 else layer
        if not 0 <= full <= n_layers:
            raise ValueError(f"layer {layer} is out of range: these vectors cover layers 0..{n_layers}")
        direction_index(full)
        resolved.append(full)
    if not np.isfinite(coef):
        raise ValueError(f"coef must be finite, got {coef}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = kind or vectors.default_kind
    # Written beside the target and renamed into place: a reader (or the vectors this was exported from, should
    # they share the name) never sees a half-written file, and a failure leaves the old file as it was.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), ARCH)  # sets general.architecture
        writer.add_string(_KEY_HINT, model_hint)
        writer.add_int32(_KEY_COUNT, len(set(resolved)))
        writer.add_string(_KEY_TRAIT, vectors.trait)
        writer.add_string(_KEY_MODEL, vectors.model_name)
        writer.add_string(_KEY_KIND, kind)
        writer.add_int32(_KEY_N_LAYERS, n_layers)
        writer.add_float32(_KEY_COEF, float(coef))
        for layer in sorted(set(resolved)):
            vec = vectors.get(layer, kind, normalize=normalize).detach().float().cpu() * float(coef)
            writer.add_tensor(f"direction.{direction_index(layer)}", vec.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)  # mkstemp makes it owner-only; an export is meant to be read by other tools
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (AttributeError, IndexError, ValueError):  # older gguf: decode the last part by hand
        part = field.parts[field.data[0]]
        return bytes(part).decode() if part.dtype == np.uint8 else part.tolist()[0]


def _text_field(reader, key: str, path: Path) -> str | None:
    """A string metadata value, or None when absent; any other type names the file and the key."""
    value = _field_value(reader, key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: metadata {key} must be a string, got {type(value).__name__}")
    return value


def read_control_vector(
    path: str | Path,
    *,
    n_layers: int | None = None,
    model=None,
    trait: str | None = None,
    kind: str = "response_mean",
) -> TraitVectors:
    """Read a llama.cpp control-vector GGUF (from llama.cpp's cvector-generator, repeng, saklas or steerlib).

    ``direction.N`` becomes row ``N + 1`` of a ``[n_layers + 1, d_model]`` table (steerlib layer N + 1); rows the file
    does not set are zero (steering there raises "all zeros"). The loader's rules are enforced with the file name
    in the error: names ``direction.<N>`` with N >= 1, 1-D float32 tensors of one width. Tensors with the same N
    are summed, as llama.cpp does.

    Args:
        path: the ``.gguf`` file.
        n_layers: the model's number of blocks; default: from ``model``, else the file's ``steerlib.n_layers``,
            else the deepest direction + 1.
        model: optional HF model; fixes ``n_layers`` and checks width and depth.
        trait: trait name (default: the file's ``steerlib.trait`` or the file stem).
        kind: pooling kind to file the vectors under, unless the file names one.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no control vector file at {path}")
    _Header(path, path.read_bytes()).walk()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many types on damaged files; one line names it
        raise ValueError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _text_field(reader, "general.architecture", path)
    if arch is not None and arch != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}: this GGUF is not a control vector")
    directions: dict[int, np.ndarray] = {}
    width = None
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise ValueError(f"{path}: tensor {tensor.name!r} is not named direction.<layer>")
        index = check_size(int(match.group(1)), f"the layer index of {tensor.name}", path,
                           MAX_LAYERS - 1)
        if index == 0:
            raise ValueError(f"{path}: direction.0 is invalid (llama.cpp never steers block 0)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, control vectors must be F32")
        data = np.asarray(tensor.data, dtype=np.float32)
        if data.ndim != 1 and not (data.ndim == 2 and 1 in data.shape):
            raise ValueError(f"{path}: {tensor.name} has shape {tuple(data.shape)}, control vectors must be 1-D")
        data = data.reshape(-1)
        if data.size == 0:
            raise ValueError(f"{path}: {tensor.name} is empty (width 0)")
        if not np.isfinite(data).all():
            raise ValueError(f"{path}: {tensor.name} (steerlib layer {index + 1}) contains NaN or inf values")
        if width is None:
            width = data.shape[0]
        elif data.shape[0] != width:
            raise ValueError(f"{path}: {tensor.name} has width {data.shape[0]} but earlier directions have {width}")
        directions[index] = directions.get(index, 0) + data
    if not directions:
        raise ValueError(f"{path}: no direction.<layer> tensors")
    if model is not None:
        from steerlib.core.arch import get_layout

        n_layers = get_layout(model).n_layers
    if n_layers is None:
        stored = _field_value(reader, _KEY_N_LAYERS)
        n_layers = max(directions) + 1 if stored is None else check_size(
            stored, _KEY_N_LAYERS, path, MAX_LAYERS, minimum=1)
    deepest = max(directions)
    if deepest + 1 > n_layers:
        raise ValueError(f"{path}: direction.{deepest} edits layer {deepest + 1}, past the model's {n_layers} blocks")
    check_table(n_layers + 1, width, path, "the direction tensors")
    table = torch.zeros(n_layers + 1, width, dtype=torch.float32)
    for index, data in directions.items():
        summed = torch.from_numpy(np.array(data, dtype=np.float32))
        if not torch.isfinite(summed).all():  # two finite directions with the same index can overflow
            raise ValueError(f"{path}: direction.{index} (steerlib layer {index + 1}) sums to NaN or inf values")
        table[index + 1] = summed
    kind = _text_field(reader, _KEY_KIND, path) or kind
    layers = sorted(i + 1 for i in directions)
    metadata = {"source": "llama.cpp control vector", "path": str(path), "layers": layers,
                "model_hint": _text_field(reader, _KEY_HINT, path)}
    coef = _field_value(reader, _KEY_COEF)
    if coef is not None:
        if isinstance(coef, bool) or not isinstance(coef, int | float) or not np.isfinite(coef):
            raise ValueError(f"{path}: metadata {_KEY_COEF} must be a finite number, got {coef!r}")
        metadata["coef"] = float(coef)
    if len(layers) == 1:
        metadata["recommended_layer"] = layers[0]
    tv = TraitVectors(
        vectors={kind: table},
        model_name=_text_field(reader, _KEY_MODEL, path) or "unknown",
        trait=trait or _text_field(reader, _KEY_TRAIT, path) or path.stem,
        method="gguf_import",
        metadata=metadata,
    )
    if model is not None:
        tv.check_model(model)
    return tv
