"""References: parse `IMAGE:LABEL` and nnU-Net raw folders, check them, preprocess, crop around the structures.

A reference label's values are arbitrary non-negative integers; each non-zero value is a class. Before
preprocessing the values are mapped to consecutive indices 1..n (nnU-Net stores labels as int8/int16), and back
to the values when the output is written.

Crops are patch-sized windows of the preprocessed reference centred on the structures (Iris encodes the task
from structure-centred reference crops): classes whose bounding boxes fit one window together share it,
otherwise each gets its own, and a volume smaller than the patch is padded.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from scipy.ndimage import find_objects

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.alignment import AlignmentAnchor, alignment_anchor
from iris_nnu.inference.images import (
    CHANNEL_SUFFIX,
    SUPPORTED_ENDINGS,
    check_files_geometry,
    file_ending,
    read_images,
    read_label,
    reader_writer_for,
    strip_ending,
)
from iris_nnu.inference.plans import ORIGINAL_BODY_BOX_KEY, RunPreprocessing
from iris_nnu.inference.registration import RegistrationAtlas
from iris_nnu.model.position import ScanFrame, position_prior_from_labels
from iris_nnu.orientation import reorient
from iris_nnu.preprocessing.frames import scan_frame


@dataclass
class ReferenceCase:
    """One reference pair: image channel files (or a DICOM series folder) and a label image."""

    name: str
    images: list[str]
    label: str


@dataclass
class Crop:
    """A patch-sized window: image (C, *patch) float32 and class indices (*patch) int16 (0 = background)."""

    image: np.ndarray
    labels: np.ndarray
    encode: list[int]  # class indices whose structures this window is centred on (encoded from it)
    origin: tuple[int, ...] = (0, 0, 0)  # the window's first voxel in the preprocessed scan (negative: padded)
    frame: ScanFrame | None = None  # where the scan's body lies (None: the window is the scan)


@dataclass
class PreparedReference:
    """A preprocessed reference, reduced to its crops; `values[i - 1]` is the label value of index i."""

    case: ReferenceCase
    values: list[int]
    crops: list[Crop] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # label values too small to survive resampling
    held: list[int] = field(default_factory=list)  # every non-zero value of the label, selected or not
    positions: torch.Tensor | None = None  # (len(values), G, G, G) where each class lies in the scan (position grid)
    anchor: AlignmentAnchor | None = None  # the scan, coarse, for registering queries to it (inference/alignment.py)
    atlas: RegistrationAtlas | None = None  # the scan and label before resampling, for --registration_fusion


# ------------------------------------------------------------------------------------------- parsing
def channel_files(image: str, num_channels: int) -> list[str]:
    """All channel files of a reference image: the file itself, or its `_0000` siblings for several channels."""
    if num_channels == 1 or os.path.isdir(image):
        return [image]
    match = CHANNEL_SUFFIX.match(strip_ending(image))
    ending = file_ending(image)
    if not match or match["channel"] != "0000" or ending is None:
        raise IrisInputError(f"{image}: the model takes {num_channels} channels; give the _0000 file of a "
                             f"case whose channels are named {{case}}_0000..._{num_channels - 1:04d}{ending or ''}")
    folder = os.path.dirname(image)
    return [os.path.join(folder, f"{match['case']}_{c:04d}{ending}") for c in range(num_channels)]


def _raw_folder_references(folder: str, num_channels: int) -> list[ReferenceCase]:
    images_dir, labels_dir = os.path.join(folder, "imagesTr"), os.path.join(folder, "labelsTr")
    labels = sorted(f for f in os.listdir(labels_dir) if not f.startswith(".") and file_ending(f))
    if not labels:
        raise IrisInputError(f"{labels_dir}: no label images ({', '.join(SUPPORTED_ENDINGS)})")
    cases = []
    for label in labels:
        case, ending = strip_ending(label), file_ending(label)
        images = [os.path.join(images_dir, f"{case}_{c:04d}{ending}") for c in range(num_channels)]
        plain = os.path.join(images_dir, f"{case}{ending}")
        if num_channels == 1 and not os.path.exists(images[0]) and os.path.exists(plain):
            images = [plain]
        for path in images:
            if not os.path.exists(path):
                raise IrisInputError(f"{path}: not found (image of reference label {os.path.join(labels_dir, label)})")
        cases.append(ReferenceCase(case, images, os.path.join(labels_dir, label)))
    return cases


def parse_reference(spec: str, num_channels: int) -> list[ReferenceCase]:
    """`IMAGE:LABEL`, or a folder in nnU-Net raw layout (imagesTr/ + labelsTr/) whose pairs are all used."""
    if os.path.isdir(spec):
        if os.path.isdir(os.path.join(spec, "imagesTr")) and os.path.isdir(os.path.join(spec, "labelsTr")):
            return _raw_folder_references(spec, num_channels)
        raise IrisInputError(f"{spec}: reference folder without imagesTr/ and labelsTr/ (or give IMAGE:LABEL)")
    # split at the last ':' that is not a Windows drive letter's ('C:\\' or 'C:/' at the start of either path)
    split = next((i for i in range(len(spec) - 1, -1, -1) if spec[i] == ":" and not (
        i >= 1 and spec[i - 1].isalpha() and (i == 1 or spec[i - 2] == ":") and spec[i + 1:i + 2] in ("\\", "/"))),
        None)
    if split is None:
        raise IrisInputError(f"{spec}: a reference is IMAGE:LABEL or a folder with imagesTr/ and labelsTr/")
    image, label = spec[:split], spec[split + 1:]
    if not image or not label:
        raise IrisInputError(f"{spec}: a reference is IMAGE:LABEL")
    return [ReferenceCase(strip_ending(label), channel_files(image, num_channels), label)]


# ----------------------------------------------------------------------------------------- crops
def _boxes(labels: np.ndarray, indices: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    slices = find_objects(labels.astype(np.int32, copy=False), max_label=max(indices))
    return {i: (np.array([s.start for s in slices[i - 1]]), np.array([s.stop for s in slices[i - 1]]))
            for i in indices if slices[i - 1] is not None}


def crop_window(data: np.ndarray, labels: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                patch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The patch-sized window centred on box [lo, hi), shifted inside the volume, zero-padded where it is smaller;
    also its first voxel's position in the volume."""
    shape = np.array(labels.shape)
    patch_arr = np.array(patch)
    start = np.round((lo + hi) / 2 - patch_arr / 2).astype(int)
    start = np.clip(start, 0, np.maximum(shape - patch_arr, 0))
    stop = np.minimum(start + patch_arr, shape)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    pad_before = (patch_arr - (stop - start)) // 2
    pad = [(int(b), int(p - (e - s) - b)) for b, p, s, e in zip(pad_before, patch_arr, start, stop)]
    image = np.pad(data[(slice(None), *region)], [(0, 0), *pad]).astype(np.float32, copy=False)
    origin = tuple(int(a - b) for a, b in zip(start, pad_before))
    return image, np.pad(labels[region], pad).astype(np.int16, copy=False), origin


def structure_crops(data: np.ndarray, labels: np.ndarray, indices: list[int], patch: tuple[int, ...],
                    frame: ScanFrame | None = None) -> list[Crop]:
    """Crops centred on the structures of `indices`; classes whose boxes fit one window together share it.
    `frame`: where the scan's body lies (kept with each crop, for its coordinates)."""
    boxes = _boxes(labels, indices)
    groups: list[tuple[np.ndarray, np.ndarray, list[int]]] = []
    # largest structures first, so small ones join a window that already exists
    for i in sorted(boxes, key=lambda i: -int(np.prod(boxes[i][1] - boxes[i][0]))):
        lo, hi = boxes[i]
        for g, (glo, ghi, members) in enumerate(groups):
            ulo, uhi = np.minimum(glo, lo), np.maximum(ghi, hi)
            if np.all(uhi - ulo <= np.array(patch)):
                groups[g] = (ulo, uhi, members + [i])
                break
        else:
            groups.append((lo, hi, [i]))
    crops = []
    for lo, hi, members in groups:
        image, crop_labels, origin = crop_window(data, labels, lo, hi, patch)
        inside = [i for i in members if np.any(crop_labels == i)]
        if inside:
            crops.append(Crop(image, crop_labels, sorted(inside), origin, frame))
        for i in set(members) - set(inside):
            # a structure larger than the window whose box centre misses it (a ring, a C shape): centre on a voxel
            voxels = np.argwhere(labels == i)
            voxel = voxels[len(voxels) // 2]
            image, crop_labels, origin = crop_window(data, labels, voxel, voxel + 1, patch)
            crops.append(Crop(image, crop_labels, [i], origin, frame))
    return crops


# -------------------------------------------------------------------------------------- preparation
def prepare_reference(case: ReferenceCase, preprocessing: RunPreprocessing, plans_reader_writer: type[BaseReaderWriter],
                      patch: tuple[int, ...], classes: list[int] | None = None,
                      position_grid: int = 0, orientation: str | None = None,
                      keep_atlas: bool = False) -> PreparedReference:
    """Check, read, preprocess and crop one reference; `classes` limits it to those label values; with a
    `position_grid`, also where each class lies in the whole preprocessed scan; `orientation`: the run's voxel
    order (iris_nnu/orientation.py; None: as stored); `keep_atlas`: also its RegistrationAtlas."""
    check_files_geometry(case.images, against=case.label)
    reader_writer = reader_writer_for(case.label, plans_reader_writer)
    data, properties = read_images(case.images, reader_writer_for(case.images[0], plans_reader_writer))
    label = read_label(case.label, reader_writer)
    if "sitk_stuff" in properties:
        data, properties, label = reorient(data, properties, orientation, label)
    held = [int(v) for v in np.unique(label) if v != 0]
    if not held:
        raise IrisInputError(f"{case.label}: empty reference label (no non-zero voxels)")
    values = [v for v in held if classes is None or v in set(classes)]
    if not values:
        return PreparedReference(case, [], held=held)
    sorted_values = np.array(values)
    position = np.searchsorted(sorted_values, label).clip(max=len(values) - 1)
    indices = np.where(sorted_values[position] == label, position + 1, 0).astype(np.int16)
    del label, position
    original = data[0]
    data, seg, _ = preprocessing(data, indices, properties)
    prepared = reference_from_preprocessed(case, data, seg, values, held, scan_frame(properties), patch,
                                           position_grid, preprocessing.configuration_manager.spacing)
    if keep_atlas:
        image, spacing = preprocessing.cropped_original(original, properties)
        labels, _ = preprocessing.cropped_original(indices[0], properties)
        if ORIGINAL_BODY_BOX_KEY in properties:  # a CT registers by its body (and every label) alone, as its queries
            labelled = find_objects((labels > 0).astype(np.int8))[0]
            region = tuple(slice(min(lo, sl.start), max(hi, sl.stop))
                           for (lo, hi), sl in zip(properties[ORIGINAL_BODY_BOX_KEY], labelled))
            image, labels = image[region], labels[region]
        prepared = dataclasses.replace(prepared, atlas=RegistrationAtlas(image, labels, tuple(values), spacing))
    return prepared


def reference_from_preprocessed(case: ReferenceCase, data: np.ndarray, seg: np.ndarray, values: list[int],
                                held: list[int], frame: ScanFrame, patch: tuple[int, ...], position_grid: int = 0,
                                spacing: Sequence[float] | None = None) -> PreparedReference:
    """A preprocessed reference (image (C, X, Y, Z); `seg` indexes `values`, i = values[i - 1], 0 background) ->
    its crops and position priors, renumbered to the classes that survived preprocessing (a reference may lack
    some of `values`); with a position grid and the voxel `spacing` (mm), also its anchor for registering queries.
    Inference (prepare_reference) and iris_train's validation both make their tasks with it."""
    present = [int(i) for i in np.unique(seg) if i > 0]
    if not present:
        raise IrisInputError(f"{case.label}: the labelled structures vanish when resampled to the model's spacing")
    remap = np.zeros(len(values) + 1, dtype=np.int16)
    remap[present] = np.arange(1, len(present) + 1)
    seg = remap[np.clip(seg, 0, None)]
    crops = structure_crops(data, seg, list(range(1, len(present) + 1)), patch, frame)
    positions = position_prior_from_labels(torch.from_numpy(seg), range(1, len(present) + 1), position_grid,
                                           frame) if position_grid else None
    return PreparedReference(case, [values[i - 1] for i in present], crops,
                             lost=[v for i, v in enumerate(values, start=1) if i not in present], held=held,
                             positions=positions,
                             anchor=alignment_anchor(data, frame, spacing) if position_grid and spacing else None)


def remap_crops(reference: PreparedReference, classes: list[int]) -> list[Crop]:
    """The reference's crops with labels and `encode` re-indexed to the run's classes (index i = classes[i-1])."""
    lookup = np.zeros(len(reference.values) + 1, dtype=np.int16)
    lookup[1:] = [classes.index(v) + 1 for v in reference.values]
    return [Crop(c.image, lookup[c.labels], [int(lookup[i]) for i in c.encode], c.origin, c.frame)
            for c in reference.crops]


def remap_positions(reference: PreparedReference, classes: list[int]) -> torch.Tensor | None:
    """The reference's position priors indexed by the run's classes (row i - 1 = classes[i-1]; zero if absent)."""
    if reference.positions is None:
        return None
    out = reference.positions.new_zeros(len(classes), *reference.positions.shape[1:])
    out[[classes.index(v) for v in reference.values]] = reference.positions
    return out
