"""Small synthetic datasets in nnU-Net raw format, made on the fly so tests run anywhere."""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk


def blob_volume(shape_zyx: tuple[int, int, int], rng: np.random.Generator, modality: str, num_classes: int,
                radii: tuple[float, float] = (0.18, 0.3), spread: float = 0.4, layout_seed: int | None = None,
                alike: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An image with a body and `num_classes` ellipsoids of distinct brightness, and its label map (centres within
    +-spread, radii in `radii`, in units of the half-size of the volume). With `layout_seed` every volume has the
    same layout (like anatomy), up to a small shift of each structure; with `alike` every structure has the same
    brightness (like cortical parcels: only where they lie tells them apart)."""
    layout = rng if layout_seed is None else np.random.default_rng(layout_seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape_zyx], indexing="ij")
    body = (z / 0.9) ** 2 + (y / 0.85) ** 2 + (x / 0.85) ** 2 < 1
    label = np.zeros(shape_zyx, np.uint8)
    for k in range(1, num_classes + 1):
        centre = layout.uniform(-spread, spread, 3)
        radius = layout.uniform(*radii, 3)
        if layout_seed is not None:
            centre = centre + rng.normal(0, 0.03, 3)
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radius)) < 1
        label[inside & body] = k
    if modality == "CT":  # Hounsfield-like: air -1000, soft tissue ~40, structures brighter
        image = np.where(body, 40.0, -1000.0)
        for k in range(1, num_classes + 1):
            image[label == k] = 40 + 150 * (1 if alike else k)
        image += rng.normal(0, 15, shape_zyx)
    else:  # MR-like: arbitrary scale per image, zero outside the body
        scale = rng.uniform(200, 2000)
        image = np.where(body, 1.0, 0.0)
        for k in range(1, num_classes + 1):
            image[label == k] = 1.0 + 0.6 * (1 if alike else k)
        image = (image + rng.normal(0, 0.05, shape_zyx) * body) * scale
        image[~body] = 0
    return image.astype(np.float32), label


def write_volume(array_zyx: np.ndarray, spacing_xyz: tuple[float, float, float], path: str,
                 origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(origin)
    sitk.WriteImage(image, path)


def make_raw_dataset(raw_root: str, dataset_id: int, name: str, num_cases: int = 6,
                     shape_zyx: tuple[int, int, int] = (24, 32, 32), spacing_xyz=(1.0, 1.0, 1.0),
                     modality: str = "MR", num_classes: int = 2, seed: int = 0, prefix: str = "case",
                     **blob_options) -> str:
    """Write DatasetXXX_name with imagesTr/labelsTr/dataset.json under raw_root; returns its folder."""
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_cases):
        image, label = blob_volume(shape_zyx, rng, modality, num_classes, **blob_options)
        case = f"{prefix}_{i:03d}"
        write_volume(image, spacing_xyz, os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        write_volume(label, spacing_xyz, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    labels = {"background": 0, **{f"structure{k}": k for k in range(1, num_classes + 1)}}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": modality}, "labels": labels, "numTraining": num_cases,
                   "file_ending": ".nii.gz", "name": name}, f, indent=2)
    return folder
