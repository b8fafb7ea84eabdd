"""DICOM outputs of iris_predict for DICOM-series queries: DICOM-SEG and RTSTRUCT, each referencing the query's series.

DICOM-SEG is written by highdicom (a maintained library of DICOM objects: it copies the patient, study and Frame of
Reference of the source images and references each source slice per frame). highdicom does not write RTSTRUCT, so
RTSTRUCT is written by rt-utils (a maintained library for RTSTRUCT from masks: one named ROI per structure, contours
per slice traced with OpenCV, referencing every slice of the series). Neither is written by hand here.

Also `write_dicom_series`: an image as a DICOM MR series (pydicom), for the demo and the tests.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import warnings
from typing import Sequence

import numpy as np
import SimpleITK as sitk

import iris_nnu
from iris_nnu.errors import IrisInputError
from iris_nnu.files import write_atomic
from iris_nnu.inference.images import dicom_series_files, file_ending

SEG_SUFFIX = "_seg.dcm"
RTSTRUCT_SUFFIX = "_rtstruct.dcm"
DICOM_TYPES = ("dicom_seg", "rtstruct")
SERIES_NUMBER = 901  # of the SEG / RTSTRUCT series made here
ALGORITHM_NAME = "iris-nnu"


def check_dicom_queries(input_path: str, output_types: Sequence[str]) -> None:
    """DICOM outputs need DICOM-series queries: any image file among the queries is a one-line error."""
    wanted = [t for t in output_types if t in DICOM_TYPES]
    if not wanted:
        return
    path = os.path.normpath(input_path)
    if os.path.isdir(path) and _series_folder(path):
        return
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = [os.path.join(path, e) for e in sorted(os.listdir(path))
                 if not e.startswith(".") and os.path.isfile(os.path.join(path, e)) and file_ending(e)]
    else:
        return  # find_queries reports a missing input
    if files:
        raise IrisInputError(f"--output_type {' '.join(wanted)} needs DICOM-series queries (it references the "
                             f"source series), but {files[0]} is not one; use --output_type nifti for image files")


def _series_folder(path: str) -> bool:
    try:
        return bool(dicom_series_files(path))
    except IrisInputError:
        return True  # several series: find_queries reports it


def read_series(folder: str) -> list:
    """The pydicom datasets of the one series in `folder`, in SimpleITK's slice order (the output's z index)."""
    import pydicom

    files = dicom_series_files(folder)
    if not files:
        raise IrisInputError(f"{folder}: no DICOM series in it")
    return [pydicom.dcmread(f) for f in files]


def _check_shape(labels: np.ndarray, series: list, folder: str) -> None:
    expected = (len(series), int(series[0].Rows), int(series[0].Columns))
    if labels.shape != expected:
        raise IrisInputError(f"{folder}: segmentation of shape {labels.shape}, the series is {expected} "
                             f"(slices, rows, columns)")


def write_dicom_seg(labels: np.ndarray, folder: str, path: str, classes: Sequence[int], names: dict[int, str],
                    model_id: str, description: str = "") -> None:
    """A DICOM-SEG (binary, one segment per class, named) of `labels` (Z, Y, X as SimpleITK reads the series in
    `folder`) that references that series, written atomically to `path`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    series = read_series(folder)
    _check_shape(labels, series, folder)
    segment_of = np.zeros(int(max(classes, default=0)) + 1, dtype=np.uint16)  # label value -> segment number
    for number, value in enumerate(classes, start=1):
        segment_of[int(value)] = number
    label_map = segment_of[np.where(np.isin(labels, list(classes)), labels, 0)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=iris_nnu.__version__,
        parameters={"model_id": model_id})
    segments = []
    for number, value in enumerate(classes, start=1):
        name = names[int(value)]
        segment = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        segment.SegmentDescription = f"{name} (label {int(value)}): iris-nnu in-context segmentation {description}"
        segments.append(segment)
    seg = hd.seg.Segmentation(
        source_images=series, pixel_array=label_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=f"{ALGORITHM_NAME} model {model_id}"[:64],
        software_versions=iris_nnu.__version__, device_serial_number=model_id[:64],
        content_label="IRIS", content_description="iris-nnu in-context segmentation",
        series_description=f"iris-nnu SEG {description}"[:64],
        omit_empty_frames=bool(label_map.any()))  # an all-empty SEG keeps its frames (highdicom needs one)
    write_atomic(path, seg.save_as)


def write_rtstruct(labels: np.ndarray, folder: str, path: str, classes: Sequence[int], names: dict[int, str],
                   model_id: str, description: str = "") -> None:
    """An RTSTRUCT (one named ROI of contours per class) of `labels` (Z, Y, X as SimpleITK reads the series in
    `folder`) that references that series' slices, written atomically to `path` (rt-utils)."""
    from rt_utils import ds_helper, image_helper
    from rt_utils.rtstruct import RTStruct

    series = read_series(folder)
    _check_shape(labels, series, folder)
    order = {ds.SOPInstanceUID: z for z, ds in enumerate(series)}
    ordered = sorted(series, key=image_helper.get_slice_position)  # rt-utils' slice order
    index = [order[ds.SOPInstanceUID] for ds in ordered]
    with quiet_pydicom():  # rt-utils sets FileDataset.is_little_endian, deprecated in pydicom 3 (a warning per file)
        rtstruct = RTStruct(ordered, ds_helper.create_rtstruct_dataset(ordered))
    rtstruct.ds.Manufacturer = ALGORITHM_NAME
    rtstruct.ds.ManufacturerModelName = f"{ALGORITHM_NAME} model {model_id}"[:64]
    rtstruct.ds.SoftwareVersions = iris_nnu.__version__
    rtstruct.ds.InstitutionName = ""
    rtstruct.ds.StructureSetLabel = "iris-nnu"
    rtstruct.ds.SeriesNumber = SERIES_NUMBER
    rtstruct.set_series_description(f"iris-nnu RTSTRUCT {description}"[:64])
    for value in classes:
        mask = np.transpose(labels[index] == int(value), (1, 2, 0))  # (rows, columns, slices)
        with contextlib.redirect_stdout(io.StringIO()):  # rt-utils prints a note for an empty ROI
            rtstruct.add_roi(mask=np.ascontiguousarray(mask), name=names[int(value)],
                             description=f"label {int(value)}: iris-nnu in-context segmentation {description}",
                             roi_generation_algorithm="AUTOMATIC")
    fix_rt_utils_pixel_spacing(rtstruct.ds, ordered)
    with quiet_pydicom():
        write_atomic(path, rtstruct.ds.save_as)


def fix_rt_utils_pixel_spacing(ds, ordered: list) -> None:
    """Move rt-utils' contour points to where the pixels are: rt-utils 1.2.7 scales the row direction by the row
    spacing (PixelSpacing[0]) instead of the column spacing, which misplaces contours where the two differ
    (qurit/rt-utils issue 92, fixed after that release). The correction is the identity for square pixels and for
    an rt-utils that maps pixels right."""
    from rt_utils import image_helper

    used = image_helper.get_pixel_to_patient_transformation_matrix(ordered).astype(np.float64)
    row_direction, column_direction, slice_direction = image_helper.get_slice_directions(ordered[0])
    row_spacing, column_spacing = (float(v) for v in ordered[0].PixelSpacing)
    right = np.identity(4)
    right[:3, 0] = row_direction * column_spacing  # along a row: the next column
    right[:3, 1] = column_direction * row_spacing  # down a column: the next row
    right[:3, 2] = slice_direction * image_helper.get_spacing_between_slices(ordered)
    right[:3, 3] = np.array(ordered[0].ImagePositionPatient, dtype=np.float64)
    correction = right @ np.linalg.inv(used)
    if np.allclose(correction, np.identity(4), atol=1e-6):
        return
    for roi in ds.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            points = np.array(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            moved = points @ correction[:3, :3].T + correction[:3, 3]
            contour.ContourData = [float(f"{v:.6f}") for v in moved.ravel()]


@contextlib.contextmanager
def quiet_pydicom():
    """pydicom's deprecation warnings (also logged) silenced: they are rt-utils' to fix, not the user's."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def write_dicom_series(image: sitk.Image, folder: str, patient_id: str = "IRIS^DEMO", modality: str = "MR",
                       series_description: str = "") -> list[str]:
    """Write a 3D image as a DICOM series of single-frame MR images (pydicom), one file per slice; returns them.

    Voxels are stored as int16 with a rescale slope and intercept that keep the intensities."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(np.float64)  # (Z, Y, X)
    low, high = float(array.min()), float(array.max())
    integral = np.all(array == np.round(array)) and low >= -32768 and high <= 32767
    slope = 1.0 if integral else float(f"{max(high - low, 1e-6) / 65000.0:.8g}")  # as the DS text will hold them
    intercept = 0.0 if integral else float(f"{low + 32500.0 * slope:.8g}")
    stored = np.round((array - intercept) / slope).astype(np.int16)
    d = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    files = []
    for z in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, f"slice_{z:04d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_id, patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, z + 1
        ds.SeriesDescription, ds.Manufacturer = series_description[:64], ALGORITHM_NAME
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(c) for c in image.TransformIndexToPhysicalPoint((0, 0, z))]
        ds.ImageOrientationPatient = [float(c) for c in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.8g}", f"{intercept:.8g}"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
        ds.PixelData = stored[z].tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files
