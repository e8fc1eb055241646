"""Uploads: good files of every format load; hostile and malformed ones are refused with a message and run no code."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from attnviz.formats import uploads

try:
    from safetensors.numpy import save as safetensors_save
except ImportError:  # pragma: no cover - safetensors ships with transformers
    safetensors_save = None


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npz_bytes(compressed: bool = True, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Marker:
    """Unpickling this would create a file: the proof that no code ran is that the file never appears."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def hostile_pickle(path: Path) -> bytes:
    Marker.path = str(path)
    return pickle.dumps(Marker())


# ------------------------------------------------------------------------------------------------------------
# good files
# ------------------------------------------------------------------------------------------------------------


def test_npy_round_trip():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    arr = uploads.load_tensor("x.npy", npy_bytes(x), shape=(2, 3, 4))
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, x)


def test_npy_integer_and_leading_batch_of_one():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(uploads.load_tensor("x.npy", npy_bytes(x), shape=(1, 3, 4))[0], x)
    np.testing.assert_array_equal(uploads.load_tensor("x.npy", npy_bytes(x[None, None]), shape=(3, 4)), x)


def test_npz_named_qkv():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, 4)).astype(np.float32) for n in (3, 5, 5))
    arrays = uploads.load_arrays("qkv.npz", npz_bytes(query=q, key=k, value=v))
    got = uploads.inputs_from_arrays(arrays, batch=1, t=3, s=5, model_dim=4)
    np.testing.assert_array_equal(got.query, q)
    np.testing.assert_array_equal(got.key, k)
    np.testing.assert_array_equal(got.value, v)


def test_single_x_is_self_attention_and_key_defaults_to_value():
    x = np.ones((2, 4, 3), np.float32)
    got = uploads.inputs_from_arrays({"array": x}, batch=2, t=4, s=4, model_dim=3)
    assert got.query is got.key is got.value
    q, v = np.zeros((1, 2, 3), np.float32), np.ones((1, 5, 3), np.float32)
    got = uploads.inputs_from_arrays({"q": q, "v": v}, batch=1, t=2, s=5, model_dim=3)
    np.testing.assert_array_equal(got.key, v)


@pytest.mark.skipif(safetensors_save is None, reason="safetensors not installed")
def test_safetensors_written_by_the_real_library():
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float16)
    data = safetensors_save({"x": x, "w": np.arange(6, dtype=np.int64).reshape(3, 2)})
    arrays = uploads.load_arrays("t.safetensors", data)
    np.testing.assert_array_equal(arrays["x"], x.astype(np.float32))
    np.testing.assert_array_equal(arrays["w"], np.arange(6).reshape(3, 2))


def test_pt_weights_only_tensor_and_dict():
    t = torch.randn(2, 3)
    np.testing.assert_array_equal(uploads.load_tensor("x.pt", pt_bytes(t)), t.numpy())
    arrays = uploads.load_arrays("qkv.pth", pt_bytes({"query": t, "value": t.to(torch.bfloat16)}))
    assert set(arrays) == {"query", "value"}


# ------------------------------------------------------------------------------------------------------------
# hostile files: refused, and no code runs
# ------------------------------------------------------------------------------------------------------------


def test_pickled_pt_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    Marker.path = str(marker)
    torch.save({"x": Marker()}, payload)  # torch.save pickles the object; loading it unrestricted would run it
    with pytest.raises(ValueError, match="holds Python objects .*files are never unpickled here"):
        uploads.load_arrays("evil.pt", payload.getvalue())
    assert not marker.exists()


def test_raw_pickle_named_pt_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="refused"):
        uploads.load_arrays("evil.pt", hostile_pickle(marker))
    assert not marker.exists()
    # Sanity: the payload really would create the file if unpickled.
    pickle.loads(hostile_pickle(marker))
    assert marker.exists()


def test_object_npy_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    Marker.path = str(marker)
    arr = np.array([Marker(), 1], dtype=object)
    with pytest.raises(ValueError, match="object arrays"):
        uploads.load_arrays("evil.npy", npy_bytes(arr))
    assert not marker.exists()


def test_object_member_in_npz_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    Marker.path = str(marker)
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Marker()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        uploads.load_arrays("evil.npz", buf.getvalue())
    assert not marker.exists()


def test_zip_bomb_refused_before_decompressing():
    # 50 MB of zeros deflates to ~50 KB: refused from the zip directory, never inflated.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_bytes(np.zeros(50 * 2**20 // 8)))
    data = buf.getvalue()
    assert len(data) < uploads.MAX_FILE_BYTES
    with pytest.raises(ValueError, match="zip bomb"):
        uploads.load_arrays("bomb.npz", data)


def test_npz_too_many_members_and_too_large_in_total(monkeypatch):
    many = {f"a{i}": np.zeros(2) for i in range(uploads.MAX_MEMBERS + 1)}
    with pytest.raises(ValueError, match=f"{uploads.MAX_MEMBERS + 1} members"):
        uploads.load_arrays("many.npz", npz_bytes(**many))
    # Two members that compress only ~4x (not bombs) but unpack to more than the limit in total.
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 2**20)
    rng = np.random.default_rng(0)
    data = npz_bytes(a=rng.integers(0, 4, 600_000, dtype=np.uint8), b=rng.integers(0, 4, 600_000, dtype=np.uint8))
    assert len(data) < 2**20
    with pytest.raises(ValueError, match="unpack to 1,200,.* bytes, over the limit"):
        uploads.load_arrays("big.npz", data)


def test_oversize_file_and_too_many_elements():
    with pytest.raises(ValueError, match="bytes is over the limit"):
        uploads.load_arrays("x.npy", b"\0" * (uploads.MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="elements"):
        uploads.load_arrays("x.npy", npy_bytes(np.zeros(uploads.MAX_ELEMENTS + 1, np.uint8)))


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.array([1 + 2j, 3j]), "not a real float"),
        (np.array([True, False]), "not a real float"),
        (np.array(["a", "b"]), "not a real float"),
        (np.array([1.0, np.nan, np.inf]), "1 NaN and 1 infinite"),
        (np.array([1e30], np.float32), "1e6"),
        (np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_dtypes_and_values(arr, match):
    with pytest.raises(ValueError, match=match):
        uploads.load_arrays("x.npy", npy_bytes(arr))


def test_wrong_shape_says_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\) does not match .*\(1, 4, 3\)"):
        uploads.load_tensor("x.npy", npy_bytes(np.zeros((2, 3))), shape=(1, 4, 3))
    with pytest.raises(ValueError, match="t=3, s=5"):
        uploads.inputs_from_arrays({"x": np.zeros((1, 3, 2))}, batch=1, t=3, s=5, model_dim=2)
    with pytest.raises(ValueError, match="named x, or query and value"):
        uploads.inputs_from_arrays({"query": np.zeros((1, 3, 2)), "foo": np.zeros(2)}, batch=1, t=3, s=3, model_dim=2)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "JSON object"),
    ],
)
def test_malformed_safetensors_headers(data, match):
    with pytest.raises(ValueError, match=match):
        uploads.load_arrays("x.safetensors", data)


def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_safetensors_lying_offsets_and_bad_dtypes():
    lying = _safetensors({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16)
    with pytest.raises(ValueError, match="claims bytes"):
        uploads.load_arrays("x.safetensors", lying)
    boolean = _safetensors({"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\0\1")
    with pytest.raises(ValueError, match="dtype BOOL"):
        uploads.load_arrays("x.safetensors", boolean)
    nan = _safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, struct.pack("<f", float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        uploads.load_arrays("x.safetensors", nan)


def test_pt_with_non_tensor_entries_and_unknown_suffix():
    with pytest.raises(ValueError, match="not a tensor"):
        uploads.load_arrays("x.pt", pt_bytes({"x": torch.zeros(2), "note": "hi"}))
    with pytest.raises(ValueError, match="complex"):
        uploads.load_arrays("x.pt", pt_bytes(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(ValueError, match="unsupported file type"):
        uploads.load_arrays("x.pkl", b"anything")


def test_garbage_is_refused_per_format():
    for name in ("x.npy", "x.npz", "x.pt"):
        with pytest.raises(ValueError):
            uploads.load_arrays(name, b"this is not a tensor file at all")
