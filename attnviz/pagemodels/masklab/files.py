"""Mask files: a materialised mask as .npy bytes, and a validated .npy upload (never unpickled)."""

from __future__ import annotations

import io

import numpy as np
from torch import Tensor

MAX_UPLOAD_BYTES = 20 * 2**20  # .npy uploads

# ---------------------------------------------------------------------------------------------------------
# .npy in and out
# ---------------------------------------------------------------------------------------------------------


def npy_bytes(keep: Tensor) -> bytes:
    """The mask as a .npy file (bool, True = may attend), in whatever shape it is given."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(keep.numpy().astype(bool)), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES) -> np.ndarray:
    """Read an uploaded boolean mask: bool or 0/1 integers, shape (t, s), (b, t, s) or (b, h, t, s).

    Never unpickles (allow_pickle=False); refuses oversize files, other dtypes and other ranks with a message.
    """
    if len(data) > max_bytes:
        raise ValueError(f"the file is {len(data):,} bytes; uploads are limited to {max_bytes:,} bytes")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        # numpy answers bytes without the .npy header by offering to unpickle them: never done here, never advised.
        why = "it is not a .npy array, and pickled data is never loaded" if "pickle" in str(err) else str(err)
        raise ValueError(f"not a readable .npy file ({why}); save one with np.save('mask.npy', mask)") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError("this is an .npz archive; upload a single array saved with np.save")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.integer):
            extra = (
                " (an additive 0/-inf float mask means the opposite of a keep-mask)" if arr.dtype.kind == "f" else ""
            )
            raise ValueError(f"the mask must be bool or 0/1 integers, got dtype {arr.dtype}{extra}")
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"integer masks must hold only 0 and 1, found {values[:8].tolist()}")
        arr = arr.astype(bool)
    if arr.ndim not in (2, 3, 4) or 0 in arr.shape:
        raise ValueError(f"the mask must have shape (t, s), (b, t, s) or (b, h, t, s), got {arr.shape}")
    return arr
