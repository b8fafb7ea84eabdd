"""One voxel order for every image: scans stored in another axis order or direction are reoriented first.

The network is not invariant to axis order (a whole brain stored ASL is not one stored RAS), and a reference and a
query from two scanners are often stored differently: the same scan with its axes permuted gave labels 1 and 2
swapped (Dice 0.00). So every image is brought to the model's voxel order before preprocessing, in training and at
inference (the plans' `iris.orientation`, an orientation code of SimpleITK's DICOMOrient: a lossless permutation and
flip of the axes; an oblique scan keeps the rest of its rotation in its direction), and results go back to each
query's own storage order and header. Models planned before this rule have no such code: their runs use the voxel
order of the run's first reference, so that at least the query's storage does not matter.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# properties key: the geometry the image had as stored, before reorientation (nnU-Net's sitk_stuff form)
STORED_GEOMETRY_KEY = "iris_stored_geometry"


def orientation_code(direction) -> str:
    """The orientation code (e.g. 'RAS') of a SimpleITK direction (9 numbers): the closest axis-aligned one."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in direction])


def valid_orientation(code: str) -> bool:
    """Three letters, one of R/L, A/P and S/I each (SimpleITK's DICOMOrient codes)."""
    pairs = [set("RL"), set("AP"), set("SI")]
    return len(code) == 3 and sorted(next(i for i, p in enumerate(pairs) if c in p) if any(c in p for p in pairs)
                                     else -1 for c in code.upper()) == [0, 1, 2]


def _as_image(array: np.ndarray, geometry: dict) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def _geometry(image: sitk.Image) -> dict:
    return {"spacing": image.GetSpacing(), "origin": image.GetOrigin(), "direction": image.GetDirection()}


def _orient(volumes: np.ndarray, geometry: dict, code: str) -> tuple[np.ndarray, dict]:
    """(C, Z, Y, X) volumes sharing one geometry -> the same voxels in the voxel order of `code`, and its geometry."""
    out, new = [], geometry
    wide = np.float32 if volumes.dtype == np.float16 else volumes.dtype  # SimpleITK has no float16
    for volume in volumes:
        image = sitk.DICOMOrient(_as_image(np.ascontiguousarray(volume, dtype=wide), geometry), code)
        out.append(sitk.GetArrayFromImage(image).astype(volumes.dtype, copy=False))
        new = _geometry(image)
    return np.stack(out), new


def reorient(data: np.ndarray, properties: dict, code: str | None, label: np.ndarray | None = None
             ) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Image (C, Z, Y, X) [and label (1, Z, Y, X)] with nnU-Net's properties -> the same in the voxel order of `code`
    (None or already so: unchanged); the properties then describe the reoriented image and keep the stored geometry
    (STORED_GEOMETRY_KEY) for `to_storage`."""
    geometry = properties["sitk_stuff"]
    if code is None or orientation_code(geometry["direction"]) == code:
        return data, properties, label
    data, new = _orient(data, geometry, code)
    if label is not None:
        label, _ = _orient(label, geometry, code)
    properties = {**properties, "sitk_stuff": new, "spacing": list(np.abs(new["spacing"][::-1])),
                  STORED_GEOMETRY_KEY: geometry}
    return data, properties, label


def to_storage(volumes: np.ndarray | None, properties: dict) -> np.ndarray | None:
    """Results (Z, Y, X) or (K, Z, Y, X) in a reoriented image's voxel order -> the image's stored voxel order."""
    stored = properties.get(STORED_GEOMETRY_KEY)
    if volumes is None or stored is None:
        return volumes
    single = volumes.ndim == 3
    out, _ = _orient(volumes[None] if single else volumes, properties["sitk_stuff"],
                     orientation_code(stored["direction"]))
    return out[0] if single else out


def stored_properties(properties: dict) -> dict:
    """The properties of the image as stored (what its outputs are written with)."""
    stored = properties.get(STORED_GEOMETRY_KEY)
    if stored is None:
        return properties
    out = {k: v for k, v in properties.items() if k != STORED_GEOMETRY_KEY}
    return {**out, "sitk_stuff": stored, "spacing": list(np.abs(np.asarray(stored["spacing"])[::-1]))}
