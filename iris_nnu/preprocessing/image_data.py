"""A full check of a NIfTI file's voxel data, which SimpleITK does not make.

SimpleITK (ITK's NIfTI reader) reads a truncated `.nii` / `.nii.gz` without an error and fills the missing part
with zeros, and it turns NaN voxels of NIfTI files into zeros (`.mha` / `.nrrd` / `.gipl` keep them). So a NIfTI
file is read here once more as a stream: the gzip stream in full (its end-of-stream marker and CRC), the voxel data
at least as long as the header says (nibabel reads the header), and floating-point voxels finite. Other formats:
their readers report truncation themselves and keep NaN, which the callers check after reading.
"""
from __future__ import annotations

import gzip
import zlib

import numpy as np

from iris_nnu.errors import IrisInputError, brief

CHUNK_BYTES = 16 << 20  # a multiple of every voxel size


def check_voxel_data(path: str) -> None:
    """Raise IrisInputError (one line naming `path`) if a NIfTI file is truncated, its gzip stream corrupt or
    incomplete, or it holds NaN / infinite voxels; other files pass unchecked."""
    lower = path.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return
    import nibabel  # an nnunetv2 dependency

    try:
        proxy = nibabel.load(path).dataobj  # the header only
        shape, dtype, offset = tuple(int(s) for s in proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
    except Exception as e:  # noqa: BLE001 - any header problem: one line naming the file
        raise IrisInputError(f"{path}: unreadable NIfTI header ({type(e).__name__}: {brief(e)})") from None
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    finite = dtype.kind in "fc"
    opener = gzip.open if lower.endswith(".gz") else open
    done = 0
    try:
        with opener(path, "rb") as f:
            if len(f.read(offset)) < offset:
                raise IrisInputError(f"{path}: truncated: the file ends before its voxel data")
            while done < expected:
                chunk = f.read(min(CHUNK_BYTES, expected - done))
                if not chunk:
                    break
                usable = len(chunk) - len(chunk) % dtype.itemsize
                if finite and not np.all(np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))):
                    raise IrisInputError(f"{path}: contains NaN or infinite values")
                done += len(chunk)
            if done < expected:
                raise IrisInputError(f"{path}: truncated: {done} of the {expected} bytes of voxel data its header "
                                     f"declares ({'x'.join(map(str, shape))} {dtype.name}); an interrupted copy or "
                                     f"download?")
            while f.read(CHUNK_BYTES):  # the rest of the gzip stream: its end marker and CRC
                pass
    except EOFError:
        raise IrisInputError(f"{path}: truncated: the gzip stream ends before its end-of-stream marker (an "
                             f"interrupted copy or download?)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise IrisInputError(f"{path}: corrupt compressed data ({e})") from None
