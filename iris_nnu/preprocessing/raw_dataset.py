"""A member dataset in nnU-Net raw format: locate it, read its dataset.json, list and check its cases.

nnU-Net's own `verify_dataset_integrity` asserts and prints; Iris needs one line naming the dataset and
the file, so the checks are ours. Listing cases reuses nnU-Net's `get_filenames_of_train_images_and_targets`.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk
from nnunetv2.utilities.utils import (
    create_lists_from_splitted_dataset_folder,
    get_filenames_of_train_images_and_targets,
    get_identifiers_from_splitted_dataset_folder,
)
from tqdm import tqdm

from iris_nnu.errors import IrisInputError, require_env_folder
from iris_nnu.preprocessing.image_data import check_voxel_data

# Geometry of image channels and label must agree to this (relative) tolerance, as in nnU-Net's checks.
GEOMETRY_TOLERANCE = 1e-3


def foreground_labels(labels: dict[str, int]) -> list[int]:
    """The label values of a dataset.json `labels` map except background (0), sorted."""
    return sorted(v for v in labels.values() if v != 0)


@dataclass
class RawDataset:
    """One dataset under nnUNet_raw: its folder, dataset.json and cases {case: {'images': [...], 'label': path}}."""

    dataset_id: int
    name: str  # DatasetXXX_Name
    folder: str
    dataset_json: dict
    cases: dict[str, dict] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, int]:
        return self.dataset_json["labels"]

    @property
    def channel_names(self) -> dict[str, str]:
        return self.dataset_json["channel_names"]

    @property
    def foreground_labels(self) -> list[int]:
        return foreground_labels(self.labels)

    @property
    def has_labels(self) -> bool:
        """False for a member of images only (no labelsTr/): used for self-supervised episodes alone."""
        return all(c["label"] is not None for c in self.cases.values())


def find_raw_dataset_folder(dataset_id: int) -> str:
    """nnUNet_raw/DatasetXXX_Name for an id; exactly one folder must match."""
    raw = require_env_folder("nnUNet_raw")
    if not os.path.isdir(raw):
        raise IrisInputError(f"nnUNet_raw={raw} is not a folder")
    prefix = f"Dataset{dataset_id:03d}_"
    matches = sorted(d for d in os.listdir(raw) if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)))
    if not matches:
        raise IrisInputError(f"dataset {dataset_id}: no folder {prefix}* in nnUNet_raw={raw}")
    if len(matches) > 1:
        raise IrisInputError(f"dataset {dataset_id}: several folders match in nnUNet_raw: {', '.join(matches)}")
    return os.path.join(raw, matches[0])


def validate_dataset_json(dataset_json: dict, where: str) -> None:
    """Check the keys Iris relies on; `where` names the file in the error."""
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dataset_json:
            raise IrisInputError(f"{where}: missing key '{key}'")
    if not isinstance(dataset_json["channel_names"], dict) or not dataset_json["channel_names"]:
        raise IrisInputError(f"{where}: 'channel_names' must be a non-empty mapping like {{\"0\": \"MRI\"}}")
    labels = dataset_json["labels"]
    if not isinstance(labels, dict) or not labels:
        raise IrisInputError(f"{where}: 'labels' must be a non-empty mapping of names to integer values")
    values = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise IrisInputError(f"{where}: label '{name}' is a region {value}; Iris supports plain labels only")
        if not isinstance(value, int) or isinstance(value, bool):
            raise IrisInputError(f"{where}: label '{name}' has value {value!r}, expected an integer")
        values.append(value)
    if sorted(values) != list(range(len(values))):
        raise IrisInputError(f"{where}: label values {sorted(values)} are not consecutive integers starting at 0 "
                             f"(background 0)")
    if "ignore" in labels:
        raise IrisInputError(f"{where}: an 'ignore' label is not supported by iris-nnu")


def load_raw_dataset(dataset_id: int) -> RawDataset:
    """Locate, read and list a raw dataset; file-level problems raise IrisInputError naming the file."""
    folder = find_raw_dataset_folder(dataset_id)
    name = os.path.basename(folder)
    json_file = os.path.join(folder, "dataset.json")
    if not os.path.isfile(json_file):
        raise IrisInputError(f"{name}: {json_file} not found")
    try:
        with open(json_file) as f:
            dataset_json = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IrisInputError(f"{name}: {json_file} is not valid JSON ({e})") from None
    validate_dataset_json(dataset_json, json_file)
    if "dataset" in dataset_json:
        cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    else:
        cases = _listed_cases(folder, name, dataset_json)
    if not cases:
        raise IrisInputError(f"{name}: no training cases ending in {dataset_json['file_ending']} in imagesTr")
    return RawDataset(dataset_id, name, folder, dataset_json, dict(sorted(cases.items())))


def _listed_cases(folder: str, name: str, dataset_json: dict) -> dict[str, dict]:
    """Cases of imagesTr/ (+ labelsTr/); a dataset without labelsTr/ is a member of images only, whose cases come
    from imagesTr/ or, without it, imagesTs/ (label None)."""
    ending = dataset_json["file_ending"]
    labels_dir = os.path.join(folder, "labelsTr")
    labelled = os.path.isdir(labels_dir) and any(f.endswith(ending) for f in os.listdir(labels_dir))
    images_dir = os.path.join(folder, "imagesTr")
    if not labelled and not os.path.isdir(images_dir) and os.path.isdir(os.path.join(folder, "imagesTs")):
        images_dir = os.path.join(folder, "imagesTs")
    if not os.path.isdir(images_dir):
        raise IrisInputError(f"{name}: {os.path.join(folder, 'imagesTr')} not found")
    identifiers = get_identifiers_from_splitted_dataset_folder(images_dir, ending)
    images = create_lists_from_splitted_dataset_folder(images_dir, ending, identifiers)
    return {i: {"images": im, "label": os.path.join(labels_dir, i + ending) if labelled else None}
            for i, im in zip(identifiers, images)}


def error_text(e: Exception) -> str:
    """The last non-empty line of an exception (ITK puts the reason there), at most 200 characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of a 3D image (SimpleITK's x, y, z order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def difference(self, other: Geometry) -> str | None:
        """What differs from `other` and by how much ('size (...) vs (...)', 'spacing (...) vs (...) mm', ...), None
        when they agree."""
        if self.size != other.size:
            return f"size {self.size} vs {other.size}"
        scale = max(float(np.abs(other.spacing).max()), 1.0)
        rounded = lambda v: tuple(round(float(x), 4) for x in v)  # noqa: E731
        if not np.allclose(self.spacing, other.spacing, rtol=GEOMETRY_TOLERANCE):
            return f"spacing/origin/direction differ: spacing {rounded(self.spacing)} vs {rounded(other.spacing)} mm"
        if not np.allclose(self.origin, other.origin, atol=GEOMETRY_TOLERANCE * scale * 10):
            off = float(np.abs(np.subtract(self.origin, other.origin)).max())
            return (f"spacing/origin/direction differ: origin {rounded(self.origin)} vs {rounded(other.origin)} "
                    f"({off:.3g} mm apart)")
        if not np.allclose(self.direction, other.direction, atol=GEOMETRY_TOLERANCE):
            off = float(np.abs(np.subtract(self.direction, other.direction)).max())
            return (f"spacing/origin/direction differ: direction {rounded(self.direction)} vs "
                    f"{rounded(other.direction)} (cosines up to {off:.3g} apart)")
        return None


def geometry_of(obj: sitk.ImageFileReader | sitk.Image) -> Geometry:
    return Geometry(tuple(int(s) for s in obj.GetSize()), tuple(obj.GetSpacing()), tuple(obj.GetOrigin()),
                    tuple(obj.GetDirection()))


@contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK prints warnings (e.g. 'No Series were found') straight to stderr; keep the CLI's stderr to one line."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def check_3d(path: str, dimension: int, components: int) -> None:
    if dimension != 3:
        raise IrisInputError(f"{path}: {dimension}D image; iris-nnu needs 3D volumes")
    if components != 1:
        raise IrisInputError(f"{path}: {components} components per voxel (e.g. RGB); expected 1")


def read_header(path: str) -> Geometry:
    """Geometry of an image file from its header alone, checked to be a readable 3D scalar image."""
    if not os.path.isfile(path):
        raise IrisInputError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as e:
        raise IrisInputError(f"{path}: unreadable image ({error_text(e)})") from None
    check_3d(path, reader.GetDimension(), reader.GetNumberOfComponents())
    return geometry_of(reader)


def check_same_geometry(geometries: dict[str, Geometry], reference: str) -> Geometry:
    """Every geometry must be that of `reference` (a key); one line naming the first that differs."""
    for path, geometry in geometries.items():
        problem = geometry.difference(geometries[reference])
        if problem:
            raise IrisInputError(f"{path}: {problem} from {reference}")
    return geometries[reference]


def check_case(case: str, images: list[str], label: str | None, num_channels: int, label_values: Iterable[int] | None,
               ) -> str | None:
    """Check one case: files exist and read, 3D, channels and label share geometry; optionally label values.

    Returns None when fine, else a message naming the file. With `label_values` given the label image is read
    in full and its values checked (the slow part of --verify_dataset_integrity).
    """
    if len(images) != num_channels:
        return f"case {case}: {len(images)} image channel file(s), dataset.json names {num_channels}"
    try:
        check_same_geometry({path: read_header(path) for path in [label or images[0], *images]},
                            label or images[0])
    except IrisInputError as e:
        return str(e)
    if label is None and label_values is not None:  # a member of images only
        try:
            for path in images:
                check_voxel_data(path)
                if not np.all(np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(path)))):
                    return f"{path}: contains NaN or infinite values"
        except IrisInputError as e:
            return str(e)
        except RuntimeError as e:
            return f"{images[0]}: unreadable image ({error_text(e)})"
        return None
    if label_values is not None:
        try:
            for path in [label, *images]:
                check_voxel_data(path)  # truncated NIfTI / gzip (SimpleITK zero-fills), NaN in NIfTI (read as 0)
        except IrisInputError as e:
            return str(e)
        try:
            seg = sitk.GetArrayFromImage(sitk.ReadImage(label))
            images_data = [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in images]
        except RuntimeError as e:
            return f"{label}: unreadable image ({error_text(e)})"
        found = np.unique(seg)
        unexpected = sorted(set(found.tolist()) - set(label_values))
        if unexpected:
            return f"{label}: label values {unexpected[:10]} are not in dataset.json's labels"
        for p, d in zip(images, images_data):
            if not np.all(np.isfinite(d)):
                return f"{p}: contains NaN or infinite values"
    return None


def _check_case_star(args: tuple) -> str | None:
    return check_case(*args)


def check_raw_dataset(dataset: RawDataset, full: bool = False, num_processes: int = 1) -> None:
    """Check every case of a dataset (headers always; label values and finiteness when `full`)."""
    if "numTraining" in dataset.dataset_json and dataset.dataset_json["numTraining"] != len(dataset.cases):
        raise IrisInputError(f"{dataset.name}: dataset.json says numTraining={dataset.dataset_json['numTraining']} "
                             f"but {len(dataset.cases)} cases were found in imagesTr")
    values = list(dataset.labels.values()) if full else None
    jobs = [(c, v["images"], v["label"], len(dataset.channel_names), values) for c, v in dataset.cases.items()]
    desc = f"{dataset.name}: {'verifying' if full else 'checking'} cases"
    if num_processes > 1 and full:
        with get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_check_case_star, jobs, chunksize=4), total=len(jobs), desc=desc))
    else:
        results = [_check_case_star(j) for j in tqdm(jobs, desc=desc, disable=not full)]
    for problem in results:
        if problem is not None:
            raise IrisInputError(f"{dataset.name}: {problem}")


def find_unreadable_file(dataset: RawDataset) -> str | None:
    """After a failure deep inside nnU-Net: the first file whose voxels cannot be read, to name it."""
    for case in dataset.cases.values():
        for path in [*case["images"], *([case["label"]] if case["label"] else [])]:
            try:
                sitk.ReadImage(path)
            except RuntimeError:
                return path
    return None


def raw_case_files(raw_folder: str, case: str) -> tuple[str, str]:
    """(image, label) of a single-channel nnU-Net raw case."""
    image = os.path.join(raw_folder, "imagesTr", f"{case}_0000.nii.gz")
    label = os.path.join(raw_folder, "labelsTr", f"{case}.nii.gz")
    for path in (image, label):
        if not os.path.isfile(path):
            raise IrisInputError(f"{path}: not found; is {raw_folder} the dataset the default model was trained on?")
    return image, label


def training_cases(raw_folder: str, held_out: list[str]) -> list[str]:
    """The labelled cases of a raw dataset that are not held out."""
    labels = sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(raw_folder, "labelsTr"))
                    if f.endswith(".nii.gz"))
    return [c for c in labels if c not in set(held_out)]
