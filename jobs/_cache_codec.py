"""The byte layout of one ``teacher_outputs`` unit (cache format 2): lossless, ~2 bytes per stored logit.

A unit is an ``.npz`` written with deflate (``np.savez_compressed``) whose arrays are *byte planes*
(``[itemsize, n, k]`` uint8: every value's first byte, then every value's second byte, ...), which
deflate compresses far better than interleaved bytes:

* ``indices`` (k < C): each row's top-k class indices in *ascending class order*, stored as the
  differences to the previous index in the row (the first against 0), in the index dtype;
* ``logprobs``: the fp16 temperature-T log-probabilities in that same class order (exactly the
  fp16 values of format 1, only reordered; with k = C every class in class order, no indices);
* ``feature`` (optional): the pooled fp16 feature.

Decoding restores ``indices`` by a cumulative sum and the fp16 values bit for bit: nothing is
lost against format 1 (fp16 values + raw indices, 4 B per logit at k = 100 of 1000). A unit is
decoded whole (its bytes and arrays are at most one shard's samples), so the reader's memory stays
bounded by its unit LRU. Format 1 units (plain ``np.savez``, values largest first) are still read.
"""

from __future__ import annotations

import io

import numpy as np

FORMAT = 2


def _planes(a: np.ndarray) -> np.ndarray:
    """[n, k] of any dtype -> [itemsize, n, k] uint8 byte planes."""
    a = np.ascontiguousarray(a)
    return np.moveaxis(a.view(np.uint8).reshape(*a.shape, a.dtype.itemsize), -1, 0).copy()


def _unplanes(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_planes`."""
    return np.ascontiguousarray(np.moveaxis(planes, 0, -1)).view(dtype)[..., 0]


def encode_unit(arrays: dict[str, np.ndarray]) -> bytes:
    """``{"logprobs" [n, k] fp16, "indices" [n, k] (k < C), "feature" [n, D] fp16}`` -> the unit's bytes."""
    lp = arrays["logprobs"]
    out: dict[str, np.ndarray] = {}
    if "indices" in arrays:
        order = np.argsort(arrays["indices"], axis=1, kind="stable")
        idx = np.take_along_axis(arrays["indices"], order, 1)
        lp = np.take_along_axis(lp, order, 1)
        delta = np.diff(idx, axis=1, prepend=np.zeros((idx.shape[0], 1), idx.dtype)).astype(idx.dtype)
        out["indices"] = _planes(delta)
        out["index_dtype"] = np.array(idx.dtype.str)
    out["logprobs"] = _planes(lp.astype(np.float16))
    if "feature" in arrays:
        out["feature"] = _planes(arrays["feature"].astype(np.float16))
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    return buf.getvalue()


def decode_unit(blob: bytes, fmt: int = FORMAT) -> dict[str, np.ndarray]:
    """The unit's arrays (``logprobs`` fp16 [n, k], ``indices`` [n, k], ``feature`` fp16 [n, D]) from its bytes."""
    with np.load(io.BytesIO(blob)) as z:
        if fmt < 2:
            return {k: z[k] for k in z.files}
        out = {"logprobs": _unplanes(z["logprobs"], np.dtype(np.float16))}
        if "indices" in z.files:
            dtype = np.dtype(str(z["index_dtype"]))
            out["indices"] = np.cumsum(_unplanes(z["indices"], dtype), axis=1, dtype=np.int64).astype(dtype)
        if "feature" in z.files:
            out["feature"] = _unplanes(z["feature"], np.dtype(np.float16))
    return out
