"""Middlebury ``.flo`` optical-flow files (Baker et al., "A Database and Evaluation Methodology for
Optical Flow", IJCV 2011; the format of Middlebury, MPI-Sintel and FlyingChairs), with numpy only.

Layout, all little-endian::

    float32  202021.25        magic (the bytes spell "PIEH")
    int32    width
    int32    height
    float32  u, v, u, v, ...  height * width pairs, row-major: pixel (row y, column x) moves by
                              (u, v) pixels, u to the right, v downwards

Values above :data:`UNKNOWN_FLOW` in magnitude mark pixels whose flow is unknown (the Middlebury
convention; ground truth sets them to 1e10).
"""

from __future__ import annotations

import numpy as np

from atoken_core.errors import UserError

MAGIC = 202021.25
HEADER_BYTES = 12
UNKNOWN_FLOW = 1e9
#: the largest side a header may declare (a corrupt header would otherwise ask for terabytes)
MAX_SIDE = 1 << 16


class FloError(UserError, ValueError):
    """A ``.flo`` file that cannot be read, naming the file and what is wrong with it."""


def read_flo_bytes(data: bytes, name: str) -> np.ndarray:
    """A ``.flo`` file's bytes -> flow in pixels, float32 (height, width, 2) [u, v]. Every problem
    (short, wrong magic, impossible size, truncated or padded, NaN) is a one-line :class:`FloError`
    naming ``name``."""
    if len(data) < HEADER_BYTES:
        raise FloError(f"{name}: not a .flo file: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic = float(np.frombuffer(data, "<f4", count=1)[0])
    if magic != MAGIC:
        raise FloError(f"{name}: not a Middlebury .flo file (magic number {magic!r}, expected {MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise FloError(f"{name}: corrupt .flo header: size {width}x{height} (width x height)")
    expected = HEADER_BYTES + 8 * width * height
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise FloError(f"{name}: corrupt .flo file ({what}): a {width}x{height} field needs {expected} bytes, "
                       f"the file has {len(data)}")
    uv = np.frombuffer(data, "<f4", count=2 * width * height, offset=HEADER_BYTES).reshape(height, width, 2)
    if not np.isfinite(uv).all():
        raise FloError(f"{name}: the flow holds NaN or infinite values")
    return uv.astype(np.float32)  # a writable, native-endian copy


def flo_bytes(uv: np.ndarray) -> bytes:
    """Flow in pixels (height, width, 2) [u, v] -> the bytes of a ``.flo`` file."""
    uv = np.asarray(uv)
    if uv.ndim != 3 or uv.shape[2] != 2 or 0 in uv.shape:
        raise FloError(f"a .flo file holds a (height, width, 2) field, got shape {uv.shape}")
    height, width = uv.shape[:2]
    header = np.array([MAGIC], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    return header + np.ascontiguousarray(uv, dtype="<f4").tobytes()
