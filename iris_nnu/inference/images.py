"""Image files for inference: find queries, read and check images (NIfTI, MHA, NRRD, DICOM series), write results.

Every problem raises IrisInputError with one line that names the file. Outputs are written under a temporary
name in the output folder and renamed into place, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from iris_nnu.errors import IrisInputError
from iris_nnu.files import write_atomic
from iris_nnu.preprocessing.image_data import check_voxel_data
from iris_nnu.preprocessing.raw_dataset import (
    Geometry,
    check_3d,
    check_same_geometry,
    error_text,
    geometry_of,
    quiet_itk,
    read_header,
)

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl")
# Two-file formats are written as their one-file siblings, so a finished output is renamed into place in one step.
OUTPUT_ENDINGS = {".mhd": ".mha", ".nhdr": ".nrrd"}
DICOM_OUTPUT_ENDING = ".nii.gz"
# A NIfTI query whose sform differs from its qform: both, as its header has them, are kept in the properties under
# this key and written into the output's header (SimpleITK reads one of them and writes it as both, so tools that
# read the sform, nibabel and FSL, would place the output elsewhere than the query)
NIFTI_FORMS_KEY = "iris_nifti_forms"
NIFTI_ENDINGS = (".nii", ".nii.gz")
MAX_LABEL_VALUE = 2**32  # label values must be below it: outputs are written as uint8, uint16 or uint32
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def file_ending(path: str) -> str | None:
    """The supported ending of an image file name ('.nii.gz', '.mha', ...), else None."""
    lower = os.path.basename(path).lower()
    return next((e for e in SUPPORTED_ENDINGS if lower.endswith(e)), None)


def strip_ending(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    ending = file_ending(name)
    return name[: -len(ending)] if ending else name


def dicom_series_files(folder: str) -> list[str] | None:
    """The slice files of the one DICOM series in `folder`, None if it holds none."""
    with quiet_itk():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        if not ids:
            return None
        if len(ids) > 1:
            raise IrisInputError(f"{folder}: {len(ids)} DICOM series in one folder; put each series in its own folder")
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0]))


def read_geometry(path: str) -> Geometry:
    """Header of an image file or DICOM series folder, checked to be a readable 3D scalar image."""
    if os.path.isdir(path):
        return geometry_of(read_dicom_series(path))
    if os.path.isfile(path) and file_ending(path) is None:
        raise IrisInputError(f"{path}: not a supported image ({', '.join(SUPPORTED_ENDINGS)} or a DICOM series "
                             f"folder)")
    return read_header(path)


def read_dicom_series(folder: str) -> sitk.Image:
    files = dicom_series_files(folder)
    if not files:
        raise IrisInputError(f"{folder}: a folder, but no DICOM series in it")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as e:
        raise IrisInputError(f"{folder}: unreadable DICOM series ({error_text(e)})") from None
    check_3d(folder, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    return image


def check_files_geometry(paths: list[str], against: str | None = None) -> Geometry:
    """Read every header (files or DICOM folders); all must share the geometry of `against` (default: the first)."""
    reference = against or paths[0]
    return check_same_geometry({p: read_geometry(p) for p in dict.fromkeys([reference, *paths])}, reference)


def reader_writer_for(path: str, plans_reader_writer: type[BaseReaderWriter]) -> BaseReaderWriter:
    """The plans' reader/writer when it handles this file, else SimpleITK's (DICOM, .mhd, ...)."""
    ending = file_ending(path)
    if ending and ending in getattr(plans_reader_writer, "supported_file_endings", ()):
        return plans_reader_writer()
    return SimpleITKIO()


def sitk_to_array(images: Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
    """Channel images -> (C, Z, Y, X) float32 and the properties SimpleITKIO.read_images makes (so its write_seg,
    and label_to_sitk, restore the geometry)."""
    first = images[0]
    data = np.stack([sitk.GetArrayFromImage(image).astype(np.float32) for image in images])
    properties = {"sitk_stuff": {"spacing": first.GetSpacing(), "origin": first.GetOrigin(),
                                 "direction": first.GetDirection()},
                  "spacing": list(np.abs(first.GetSpacing()[::-1]))}
    return data, properties


def label_to_sitk(segmentation: np.ndarray, properties: dict) -> sitk.Image:
    """Label values (Z, Y, X) -> an image with the geometry of `properties` (unsigned, wide enough for the values)."""
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32) if segmentation.max(initial=0) <= np.iinfo(t).max)
    image = sitk.GetImageFromArray(segmentation.astype(dtype))
    sitk_stuff = properties["sitk_stuff"]
    image.SetSpacing(sitk_stuff["spacing"])
    image.SetOrigin(sitk_stuff["origin"])
    image.SetDirection(sitk_stuff["direction"])
    return image


def read_images(paths: list[str], reader_writer: BaseReaderWriter) -> tuple[np.ndarray, dict]:
    """Channels (C, Z, Y, X) float32 and nnU-Net properties; geometry checked; NIfTI files checked complete (the
    gzip stream too: SimpleITK zero-fills a truncated one); finite values checked in every format."""
    check_files_geometry(paths)
    if os.path.isdir(paths[0]):
        data, properties = sitk_to_array([read_dicom_series(paths[0])])
    else:
        for path in paths:
            check_voxel_data(path)  # also NaN / inf in NIfTI, which SimpleITK reads as 0
        try:
            data, properties = reader_writer.read_images(paths)
        except Exception as e:  # noqa: BLE001 - a reader's error on a corrupt file becomes one line naming it
            raise IrisInputError(f"{paths[0]}: unreadable image ({error_text(e)})") from None
    for c, path in enumerate(paths):
        if not np.all(np.isfinite(data[c])):
            raise IrisInputError(f"{path}: contains NaN or infinite values")
    forms = None if os.path.isdir(paths[0]) else nifti_forms(paths[0])
    if forms is not None:
        properties[NIFTI_FORMS_KEY] = forms
    return data, properties


def nifti_forms(path: str) -> dict | None:
    """A NIfTI file's qform and sform (affines and codes) when both are set and differ, else None (then the one
    SimpleITK reads is the whole geometry, and the output written from it is right for every reader)."""
    if not path.lower().endswith(NIFTI_ENDINGS):
        return None
    import nibabel  # an nnunetv2 dependency

    try:
        header = nibabel.load(path).header
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
    except Exception:  # noqa: BLE001 - the image readers report a bad header
        return None
    if sform is None or qform is None or np.allclose(sform, qform, atol=1e-5):
        return None
    return {"sform": np.asarray(sform, dtype=np.float64), "sform_code": int(sform_code),
            "qform": np.asarray(qform, dtype=np.float64), "qform_code": int(qform_code)}


def restore_nifti_forms(path: str, forms: dict) -> None:
    """Rewrite a NIfTI file's qform and sform (codes too) as `forms` has them; the voxels stay as written."""
    import nibabel

    image = nibabel.load(path)
    data = np.asanyarray(image.dataobj)  # read in full before the file is rewritten
    out = nibabel.Nifti1Image(data, None, image.header.copy())
    out.set_qform(forms["qform"], forms["qform_code"])
    out.set_sform(forms["sform"], forms["sform_code"])
    nibabel.save(out, path)


def read_label(path: str, reader_writer: BaseReaderWriter) -> np.ndarray:
    """A label image (1, Z, Y, X) as int64, checked to hold non-negative integers below MAX_LABEL_VALUE only.

    With SimpleITK's reader/writer the voxels are read in their own type: nnU-Net's read_seg gives float32, which
    changes label values above 2**24 (16777217 reads as 16777216)."""
    if os.path.isdir(path):
        raise IrisInputError(f"{path}: a label must be an image file, not a folder")
    check_voxel_data(path)
    try:
        if isinstance(reader_writer, SimpleITKIO):
            with quiet_itk():
                image = sitk.ReadImage(path)
            check_3d(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
            seg = sitk.GetArrayFromImage(image)[None]
        else:
            seg, _ = reader_writer.read_seg(path)
    except IrisInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise IrisInputError(f"{path}: unreadable image ({error_text(e)})") from None
    if seg.dtype.kind == "f" and (not np.all(np.isfinite(seg)) or not np.all(seg == np.round(seg))):
        bad = seg[~np.isfinite(seg) | (seg != np.round(seg))].flat[0]
        raise IrisInputError(f"{path}: label values must be integers, found {bad}")
    if seg.dtype.kind not in "fiub":
        raise IrisInputError(f"{path}: label voxels of type {seg.dtype} (expected integers)")
    if seg.size and seg.min() < 0:
        raise IrisInputError(f"{path}: negative label value {int(seg.min())}; labels are non-negative integers")
    if seg.size and seg.max() >= MAX_LABEL_VALUE:
        raise IrisInputError(f"{path}: label value {int(seg.max())} is too large; label values must be below "
                             f"2**32 = {MAX_LABEL_VALUE} (outputs are written as uint32 at most)")
    return seg.astype(np.int64)


def output_ending(first_image: str) -> str:
    if os.path.isdir(first_image):
        return DICOM_OUTPUT_ENDING
    ending = file_ending(first_image) or DICOM_OUTPUT_ENDING
    return OUTPUT_ENDINGS.get(ending, ending)


def write_segmentation(segmentation: np.ndarray, path: str, properties: dict,
                       reader_writer: BaseReaderWriter) -> None:
    """Write atomically with the reader/writer that read the query (so its geometry comes back)."""
    def write(tmp: str) -> None:
        if segmentation.max(initial=0) > np.iinfo(np.uint16).max and isinstance(reader_writer, SimpleITKIO):
            # SimpleITKIO.write_seg casts to uint16, which would wrap label values above 65535
            sitk.WriteImage(label_to_sitk(segmentation, properties), tmp, True)
        else:
            reader_writer.write_seg(segmentation, tmp, properties)
        if NIFTI_FORMS_KEY in properties and tmp.lower().endswith(NIFTI_ENDINGS):
            restore_nifti_forms(tmp, properties[NIFTI_FORMS_KEY])

    write_atomic(path, write)


# --------------------------------------------------------------------------------------------- queries
@dataclass
class Query:
    """One query case: its name (the output's), its channel files (or one DICOM folder)."""

    name: str
    images: list[str]

    @property
    def output_ending(self) -> str:
        return output_ending(self.images[0])


def _is_dicom_folder(path: str) -> bool:
    try:
        return bool(dicom_series_files(path))
    except IrisInputError:
        return True  # several series: reported when the case is read


def find_queries(input_path: str, num_channels: int) -> tuple[list[Query], list[str]]:
    """Queries in a file or folder: nnU-Net `{case}_{XXXX}` channel files, plain names, DICOM series folders.

    Returns the queries and problems (one line each, naming the file) for files that cannot form a query."""
    input_path = os.path.normpath(input_path)
    if not os.path.exists(input_path):
        raise IrisInputError(f"{input_path}: input not found")
    if os.path.isdir(input_path) and _is_dicom_folder(input_path):
        return [Query(os.path.basename(input_path), [input_path])], []
    if os.path.isfile(input_path):
        if file_ending(input_path) is None:
            raise IrisInputError(f"{input_path}: not a supported image ({', '.join(SUPPORTED_ENDINGS)} or a DICOM "
                                 f"series folder)")
        folder, names = os.path.dirname(input_path) or ".", [os.path.basename(input_path)]
        match = CHANNEL_SUFFIX.match(strip_ending(input_path))
        if match and num_channels > 1:  # one channel file given: take its case's other channels too
            stem = match["case"] + "_"
            names = [n for n in os.listdir(folder) if n.startswith(stem) and CHANNEL_SUFFIX.match(strip_ending(n))
                     and CHANNEL_SUFFIX.match(strip_ending(n))["case"] == match["case"]
                     and file_ending(n) == file_ending(input_path)]
        dicom_dirs: list[str] = []
    else:
        folder = input_path
        entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
        names = [e for e in entries if os.path.isfile(os.path.join(folder, e)) and file_ending(e)]
        dicom_dirs = [e for e in entries if os.path.isdir(os.path.join(folder, e))
                      and _is_dicom_folder(os.path.join(folder, e))]
    queries: dict[str, Query] = {}
    channels: dict[str, dict[int, str]] = {}
    problems: list[str] = []
    for name in names:
        path = os.path.join(folder, name)
        match = CHANNEL_SUFFIX.match(strip_ending(name))
        if match:
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
        elif num_channels == 1:
            case = strip_ending(name)
            if case in queries:
                problems.append(f"{path}: case name {case} is also used by {queries[case].images[0]}")
            else:
                queries[case] = Query(case, [path])
        else:
            problems.append(f"{path}: the model takes {num_channels} channels; name them "
                            f"{strip_ending(name)}_0000..._{num_channels - 1:04d}")
    for case, files in sorted(channels.items()):
        if len({file_ending(f) for f in files.values()}) > 1:
            problems.append(f"{files[min(files)]}: case {case} has channel files in several formats")
        elif sorted(files) != list(range(num_channels)):
            found = ", ".join(os.path.basename(f) for _, f in sorted(files.items()))
            problems.append(f"{files[min(files)]}: case {case} has channel files {found}; the model takes "
                            f"{num_channels} (_0000 to _{num_channels - 1:04d})")
        elif case in queries:
            problems.append(f"{files[0]}: case name {case} is also used by {queries[case].images[0]}")
        else:
            queries[case] = Query(case, [files[c] for c in range(num_channels)])
    for d in dicom_dirs:
        path = os.path.join(folder, d)
        if num_channels != 1:
            problems.append(f"{path}: a DICOM series is one channel; the model takes {num_channels}")
        elif d in queries:
            problems.append(f"{path}: case name {d} is also used by {queries[d].images[0]}")
        else:
            queries[d] = Query(d, [path])
    if not queries and not problems:
        raise IrisInputError(f"{input_path}: no images found ({', '.join(SUPPORTED_ENDINGS)} files or DICOM series "
                             f"folders)")
    return [queries[k] for k in sorted(queries)], problems
