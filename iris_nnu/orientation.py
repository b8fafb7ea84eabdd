"""One voxel order for every image: scans stored in another axis order or direction are reoriented first.

The network is not invariant to axis order (a whole brain stored ASL is not one stored RAS), and a reference and a
query from two scanners are often stored differently: the same scan with its axes permuted gave labels 1 and 2
swapped (Dice 0.00). So every image is brought to the model's voxel order before preprocessing, in training and at
inference (the plans' `iris.orientation`, an orientation code of SimpleITK's DICOMOrient: a lossless permutation and
flip of the axes; an oblique scan keeps the rest of its rotation in its direction, and one tilted by more than 3 degrees is resampled onto an axis-aligned grid),
and results go back to each
query's own storage order and header. Models planned before this rule have no such code: their runs use the voxel
order of the run's first reference, so that at least the query's storage does not matter.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# properties key: the geometry the image had as stored, before reorientation (nnU-Net's sitk_stuff form + "size")
STORED_GEOMETRY_KEY = "iris_stored_geometry"
# A scan whose axes are tilted by more than this from the axis-aligned directions of its orientation (a direction
# cosine off by sin(3 deg) = 0.05) is resampled onto an axis-aligned grid. Measured with the default model,
# hippocampus_026 from hippocampus_004 on grids turned about z: as stored 0.72 / 0.75 (15 deg), 0.66 / 0.75 (30 deg);
# resampled 0.87 / 0.87, 0.85 / 0.87 (the scan itself: 0.87 / 0.87). The abdominal MR scans are tilted by up to
# 1.2 deg and stay as stored.
OBLIQUE_TOLERANCE = 0.05


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


def aligned_direction(code: str) -> tuple[float, ...]:
    """The axis-aligned direction (9 numbers) of an orientation code."""
    return sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), code).GetDirection()


def _is_oblique(direction) -> bool:
    return float(np.abs(np.subtract(direction, aligned_direction(orientation_code(direction)))).max()) \
        > OBLIQUE_TOLERANCE


def _aligned_grid(geometry: dict, size: tuple[int, ...]) -> dict:
    """An axis-aligned grid of the same spacing that covers an oblique image's physical extent."""
    direction = np.array(aligned_direction(orientation_code(geometry["direction"]))).reshape(3, 3)
    image = _as_image(np.zeros(size[::-1], dtype=np.uint8), geometry)
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, size)])
                        for corner in np.ndindex(2, 2, 2)])
    local = corners @ direction  # physical -> aligned axes (columns of the direction are the axes)
    spacing = np.array(geometry["spacing"], dtype=float)
    low = local.min(0)
    shape = np.ceil((local.max(0) - low) / spacing).astype(int) + 1
    return {"spacing": tuple(spacing), "origin": tuple(direction @ low), "direction": tuple(direction.ravel()),
            "size": tuple(int(n) for n in shape)}


def _resample(volumes: np.ndarray, geometry: dict, target: dict, labels: bool) -> np.ndarray:
    """(C, Z, Y, X) volumes on `geometry` resampled onto the grid `target` (with its "size")."""
    reference = _as_image(np.zeros(target["size"][::-1], dtype=np.uint8), target)
    wide = np.float32 if volumes.dtype == np.float16 else volumes.dtype
    out = []
    for volume in volumes:
        image = _as_image(np.ascontiguousarray(volume, dtype=wide), geometry)
        outside = 0.0 if labels else float(volume.min())  # CT's air, MR's background
        out.append(sitk.GetArrayFromImage(sitk.Resample(
            image, reference, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
            outside)).astype(volumes.dtype, copy=False))
    return np.stack(out)


def reorient(data: np.ndarray, properties: dict, code: str | None, label: np.ndarray | None = None
             ) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Image (C, Z, Y, X) [and label (1, Z, Y, X)] with nnU-Net's properties -> the same in the voxel order of `code`
    (None or already so: unchanged), resampled onto an axis-aligned grid if it is oblique (OBLIQUE_TOLERANCE); the
    properties then describe the new image and keep the stored geometry (STORED_GEOMETRY_KEY) for `to_storage`."""
    geometry = properties["sitk_stuff"]
    oblique = _is_oblique(geometry["direction"])
    if (code is None or orientation_code(geometry["direction"]) == code) and not oblique:
        return data, properties, label
    stored = {**geometry, "size": tuple(int(n) for n in data.shape[1:][::-1])}
    if oblique:
        grid = _aligned_grid(geometry, stored["size"])
        data = _resample(data, geometry, grid, labels=False)
        if label is not None:
            label = _resample(label, geometry, grid, labels=True)
        geometry = {k: v for k, v in grid.items() if k != "size"}
    new = geometry
    if code is not None and orientation_code(geometry["direction"]) != code:
        data, new = _orient(data, geometry, code)
        if label is not None:
            label, _ = _orient(label, geometry, code)
    properties = {**properties, "sitk_stuff": new, "spacing": list(np.abs(new["spacing"][::-1])),
                  STORED_GEOMETRY_KEY: stored}
    return data, properties, label


def to_storage(volumes: np.ndarray | None, properties: dict) -> np.ndarray | None:
    """Results (Z, Y, X) or (K, Z, Y, X) in a reoriented image's voxel order -> the image's stored voxel order
    (an oblique image's: resampled back onto its grid, nearest for labels, linear for probabilities)."""
    stored = properties.get(STORED_GEOMETRY_KEY)
    if volumes is None or stored is None:
        return volumes
    single = volumes.ndim == 3
    volumes = volumes[None] if single else volumes
    if _is_oblique(stored["direction"]):
        out = _resample(volumes, properties["sitk_stuff"], stored, labels=not np.issubdtype(volumes.dtype, np.floating))
    else:
        out, _ = _orient(volumes, properties["sitk_stuff"], orientation_code(stored["direction"]))
    return out[0] if single else out


def stored_properties(properties: dict) -> dict:
    """The properties of the image as stored (what its outputs are written with)."""
    stored = properties.get(STORED_GEOMETRY_KEY)
    if stored is None:
        return properties
    out = {k: v for k, v in properties.items() if k != STORED_GEOMETRY_KEY}
    geometry = {k: v for k, v in stored.items() if k != "size"}
    return {**out, "sitk_stuff": geometry, "spacing": list(np.abs(np.asarray(stored["spacing"])[::-1]))}
