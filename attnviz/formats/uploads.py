"""Loading Q/K/V (or X) tensors from user files without ever running code from them.

Formats and how each is read safely:
    .npy          ``np.load(allow_pickle=False)``: object arrays (which need pickle) are refused.
    .npz          a zip of .npy files: member count, each member's declared size and its compression ratio are
                  checked from the zip directory BEFORE anything is decompressed (zip-bomb guard), then each
                  member is read as a .npy with pickle off.
    .safetensors  an 8-byte header length, a JSON header and raw bytes: parsed here (no code, no pickle);
                  offsets are checked against the file size.
    .pt / .pth    ``torch.load(weights_only=True)``: torch's restricted unpickler, which refuses any global
                  that is not a tensor/container type; only tensors (or dicts/lists of tensors) are accepted.

Every file is limited in bytes and in elements; every tensor must hold real floats or integers (no bool,
complex, strings or objects), be finite (no NaN / Inf) and have the shape the configuration needs. Every refusal
is a ``ValueError`` whose message says what was wrong, with the numbers.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from attnviz.experiment import expected_shapes  # re-exported: the shapes an upload must have

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_ELEMENTS",
    "MAX_MEMBERS",
    "MAX_COMPRESSION_RATIO",
    "SUFFIXES",
    "load_arrays",
    "load_tensor",
    "check_array",
    "expected_shapes",
    "UploadedInputs",
    "inputs_from_arrays",
]

MAX_FILE_BYTES = 16 * 2**20  # 16 MiB per file (the server's maxUploadSize is the outer limit)
MAX_ELEMENTS = 2_000_000  # per tensor: far beyond anything the Playground draws cell by cell
MAX_MEMBERS = 16  # tensors per .npz / .safetensors / .pt file
MAX_COMPRESSION_RATIO = 100  # a .npz member that inflates more than this is treated as a zip bomb
SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")

# safetensors dtype codes we accept (real floats and integers) -> numpy dtype
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
}
_TORCH_OK = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)


def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise ValueError(f"{name!r}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def check_array(name: str, arr: np.ndarray, *, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """The array as float32 if it is a finite real float/int array of acceptable size; else ValueError."""
    if arr.dtype == object or arr.dtype.hasobject:
        raise ValueError(f"{name}: object arrays are refused (they need pickle)")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: dtype {arr.dtype} is not a real float or integer type")
    if arr.size > max_elements:
        raise ValueError(f"{name}: {arr.size:,} elements is over the limit of {max_elements:,}")
    if arr.size == 0:
        raise ValueError(f"{name}: the array is empty (shape {arr.shape})")
    out = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        nan = int(np.isnan(out).sum())
        inf = int((~finite).sum()) - nan
        raise ValueError(
            f"{name}: {nan} NaN and {inf} infinite values (first at index {tuple(int(i) for i in bad)});"
            " every value must be finite"
        )
    if arr.dtype.kind == "f" and np.abs(out).max() > 1e6:
        raise ValueError(
            f"{name}: values up to {float(np.abs(out).max()):.3g}; keep |x| <= 1e6 so softmax and "
            "float32 stay meaningful"
        )
    return out


def _npy(name: str, data: bytes | io.BufferedIOBase) -> np.ndarray:
    buffer = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        # Read only the header first: an object dtype is refused by its name, before any data is read.
        version = np.lib.format.read_magic(buffer)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"format version {version} is not supported")
        shape, _, dtype = readers[version](buffer)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise ValueError(f"{name}: not a valid .npy file ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{name}: object arrays are refused (they need pickle)")
    count = int(np.prod(shape)) if shape else 1
    if count > MAX_ELEMENTS:
        raise ValueError(f"{name}: {count:,} elements (shape {shape}) is over the limit of {MAX_ELEMENTS:,}")
    buffer.seek(0)
    try:
        return np.load(buffer, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{name}: could not be read as .npy ({err})") from None


def _npz(name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError(f"{name}: not a valid .npz (zip) file") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ValueError(f"{name}: {len(infos)} members; at most {MAX_MEMBERS} are read")
        total = 0
        for info in infos:
            # Sizes come from the zip directory, before any decompression.
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_COMPRESSION_RATIO:
                raise ValueError(
                    f"{name}: member {info.filename!r} would inflate {ratio:,.0f}× "
                    f"({info.compress_size:,} -> {info.file_size:,} bytes); refused as a zip bomb"
                )
            total += info.file_size
            if info.file_size > MAX_FILE_BYTES or total > MAX_FILE_BYTES:
                raise ValueError(f"{name}: members unpack to {total:,} bytes, over the limit of {MAX_FILE_BYTES:,}")
        arrays = {}
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            with archive.open(info) as member:
                # Read at most the declared size (+1 to notice a directory that lies about it).
                raw = member.read(info.file_size + 1)
            if len(raw) > info.file_size:
                raise ValueError(f"{name}: member {info.filename!r} is larger than its declared size")
            arrays[key] = _npy(f"{name}[{key}]", raw)
        return arrays


def _safetensors(name: str, data: bytes) -> dict[str, np.ndarray]:
    if len(data) < 8:
        raise ValueError(f"{name}: too short to be a .safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, 1_000_000):
        raise ValueError(f"{name}: header length {header_len:,} does not fit the file ({len(data):,} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: the header must be a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_MEMBERS:
        raise ValueError(f"{name}: {len(header)} tensors; at most {MAX_MEMBERS} are read")
    body = memoryview(data)[8 + header_len :]
    arrays = {}
    for key, spec in header.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
            raise ValueError(f"{name}: tensor {key!r} has a malformed header entry")
        dtype = _SAFETENSORS_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ValueError(
                f"{name}: tensor {key!r} has dtype {spec['dtype']}; only real floats and integers "
                f"({', '.join(_SAFETENSORS_DTYPES)}) are accepted"
            )
        shape, offsets = spec["shape"], spec["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise ValueError(f"{name}: tensor {key!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            raise ValueError(f"{name}: tensor {key!r} has malformed data_offsets {offsets!r}")
        count = int(np.prod(shape)) if shape else 1
        if count > MAX_ELEMENTS:
            raise ValueError(f"{name}: tensor {key!r} has {count:,} elements, over the limit of {MAX_ELEMENTS:,}")
        start, stop = offsets
        itemsize = np.dtype(dtype).itemsize
        if not 0 <= start <= stop <= len(body) or stop - start != count * itemsize:
            raise ValueError(
                f"{name}: tensor {key!r} claims bytes {start}..{stop} for {count} × {itemsize} bytes "
                f"in a {len(body)}-byte body"
            )
        arrays[key] = np.frombuffer(body[start:stop], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return arrays


def _pt(name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the restricted unpickler raises several types; all mean "refused"
        # torch's own message advises weights_only=False, i.e. running the file's code: not advice for this app.
        detail = (
            "it holds Python objects (a pickled model or class), not just tensors"
            if "Unsupported global" in str(err) or "weights_only" in str(err)
            else f"it is not a torch tensor file ({type(err).__name__})"
        )
        raise ValueError(
            f"{name}: refused — {detail}. Save plain tensors instead, e.g. torch.save({{'x': x}}, path) "
            "or numpy.save; files are never unpickled here."
        ) from None
    if isinstance(obj, torch.Tensor):
        items = {"tensor": obj}
    elif isinstance(obj, Mapping):
        items = dict(obj)
    elif isinstance(obj, (list, tuple)):
        items = {str(i): x for i, x in enumerate(obj)}
    else:
        raise ValueError(f"{name}: holds a {type(obj).__name__}; expected a tensor or a dict/list of tensors")
    if len(items) > MAX_MEMBERS:
        raise ValueError(f"{name}: {len(items)} entries; at most {MAX_MEMBERS} are read")
    arrays = {}
    for key, value in items.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype not in _TORCH_OK:
            raise ValueError(f"{name}: entry {key!r} has dtype {value.dtype}; only real floats and integers")
        if value.numel() > MAX_ELEMENTS:
            raise ValueError(f"{name}: entry {key!r} has {value.numel():,} elements, over {MAX_ELEMENTS:,}")
        arrays[str(key)] = value.detach().to(torch.float32).numpy()
    return arrays


def load_arrays(name: str, data: bytes) -> dict[str, np.ndarray]:
    """Every tensor in an uploaded file, as float32 arrays, checked; the format comes from the file name."""
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{name}: {len(data):,} bytes is over the limit of {MAX_FILE_BYTES:,}")
    suffix = _suffix(name)
    if suffix == ".npy":
        raw = {"array": _npy(name, data)}
    elif suffix == ".npz":
        raw = _npz(name, data)
    elif suffix == ".safetensors":
        raw = _safetensors(name, data)
    else:
        raw = _pt(name, data)
    if not raw:
        raise ValueError(f"{name}: holds no tensors")
    return {key: check_array(f"{name}[{key}]" if len(raw) > 1 else name, arr) for key, arr in raw.items()}


def load_tensor(name: str, data: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The one tensor in a file (a file with several must be loaded with ``load_arrays``), optionally shape-checked.

    ``shape`` may be (t, dim) for one sequence; a (1, t, dim) array with a leading batch of 1 is accepted too.
    """
    arrays = load_arrays(name, data)
    if len(arrays) != 1:
        raise ValueError(
            f"{name}: holds {len(arrays)} tensors ({', '.join(arrays)}); upload one, or use names "
            "x / query / key / value in one file"
        )
    arr = next(iter(arrays.values()))
    return arr if shape is None else _fit(name, arr, shape)


def _fit(label: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """arr reshaped to ``shape`` when it already is that shape up to leading 1s (batch of one); else ValueError."""
    squeezed = arr
    while squeezed.ndim > len(shape) and squeezed.shape[0] == 1:
        squeezed = squeezed[0]
    if squeezed.shape == shape:
        return squeezed
    if squeezed.ndim == len(shape) - 1 and shape[0] == 1 and squeezed.shape == shape[1:]:
        return squeezed[None]
    raise ValueError(f"{label}: shape {arr.shape} does not match what the configuration needs, {shape}")


@dataclass(frozen=True)
class UploadedInputs:
    """Layer inputs from files: query (b, t, dim), key and value (b, s, dim) as float32 arrays."""

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray


def inputs_from_arrays(arrays: Mapping[str, np.ndarray], batch: int, t: int, s: int, model_dim: int) -> UploadedInputs:
    """Pick the layer inputs out of named arrays: ``x`` (self-attention: query = key = value), or ``query`` /
    ``key`` / ``value`` (``q``/``k``/``v`` also accepted; a missing key defaults to value, as Keras does).
    A single unnamed array is taken as ``x``. Shapes are checked against the configuration."""
    alias = {"q": "query", "k": "key", "v": "value", "array": "x", "tensor": "x", "input": "x", "inputs": "x"}
    named = {alias.get(k.lower(), k.lower()): v for k, v in arrays.items()}
    need = expected_shapes(batch, t, s, model_dim)
    if len(named) == 1 and "x" not in named and not {"query", "key", "value"} & set(named):
        named = {"x": next(iter(named.values()))}
    if "x" in named:
        if t != s:
            raise ValueError(
                f"one input x means self-attention (t = s), but the configuration has t={t}, s={s}; "
                "upload query and value separately"
            )
        x = _fit("x", named["x"], need["query"])
        return UploadedInputs(x, x, x)
    if "query" not in named or "value" not in named:
        raise ValueError(f"expected tensors named x, or query and value (and optionally key); got {sorted(arrays)}")
    query = _fit("query", named["query"], need["query"])
    value = _fit("value", named["value"], need["value"])
    key = _fit("key", named["key"], need["key"]) if "key" in named else value
    return UploadedInputs(query, key, value)
