"""napari reader: NIfTI, MHA/MHD, NRRD, GIPL files and DICOM series as layers that keep their geometry.

The voxels are read by SimpleITK, as iris_predict reads them, in its (z, y, x) array order. A layer's `scale` is the
voxel spacing and its `translate` the origin (both reversed to napari's axis order), so scans of one frame of
reference line up in the viewer; its metadata keep the file (`iris_source`) and the whole geometry, direction cosines
included (`iris_geometry`, SimpleITK's x, y, z order), which the widget hands to iris-nnu unchanged. Direction is not
drawn: a layer shows the voxel grid as stored.

A file opens as a labels layer when its voxels are integers and its name or folder says it holds labels (a
`labels*/` folder as in nnU-Net's raw layout, or `seg`, `label`, `mask` in its name); otherwise as an image (napari's
layer menu converts either way). Label names come from the dataset.json beside a `labels*/` folder.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.images import (
    SUPPORTED_ENDINGS,
    dicom_series_files,
    file_ending,
    read_dicom_series,
    strip_ending,
)
from iris_nnu.inference.names import dataset_json_names
from iris_nnu.preprocessing.raw_dataset import check_3d, error_text, quiet_itk

SOURCE_KEY = "iris_source"  # layer metadata: the file or DICOM folder the voxels were read from, as SimpleITK reads it
GEOMETRY_KEY = "iris_geometry"  # layer metadata: {"spacing", "origin", "direction"} in SimpleITK's x, y, z order
NAMES_KEY = "iris_label_names"  # layer metadata: {label value: structure name}
LABEL_NAME_HINT = re.compile(r"(seg|label|mask)", re.IGNORECASE)
DEMO_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_data",
                           "Dataset001_Hippocampus")

LayerData = tuple[np.ndarray, dict[str, Any], str]


def readable(path: str) -> bool:
    """A file this reader opens (a supported ending or .dcm), or a folder holding one DICOM series."""
    if os.path.isdir(path):
        try:
            return bool(dicom_series_files(path))
        except IrisInputError:
            return True  # several series: read_layers says so in one line
    return file_ending(path) is not None or path.lower().endswith(".dcm")


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader contribution: read_layers for what it can open, None to let another reader try."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return read_layers if paths and all(readable(os.fspath(p)) for p in paths) else None


def read_image(path: str) -> sitk.Image:
    """A 3D scalar image from a file or DICOM folder (a .dcm file: the series of its folder); one-line errors."""
    if os.path.isdir(path):
        return read_dicom_series(path)
    if path.lower().endswith(".dcm"):
        return read_dicom_series(os.path.dirname(os.path.abspath(path)))
    try:
        with quiet_itk():
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise IrisInputError(f"{path}: unreadable image ({error_text(e)})") from None
    check_3d(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    return image


def geometry_metadata(image: sitk.Image) -> dict[str, tuple[float, ...]]:
    return {"spacing": tuple(image.GetSpacing()), "origin": tuple(image.GetOrigin()),
            "direction": tuple(image.GetDirection())}


def is_label_file(path: str, image: sitk.Image) -> bool:
    integer = np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.integer)
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return integer and (folder.lower().startswith("labels") or bool(LABEL_NAME_HINT.search(strip_ending(path))))


def label_names_for(path: str) -> dict[int, str]:
    """{value: name} from the dataset.json of the nnU-Net raw folder holding a labels*/ folder ({} otherwise)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.basename(folder).lower().startswith("labels"):
        return {}
    try:
        return dataset_json_names(os.path.dirname(folder))
    except IrisInputError:
        return {}  # a broken dataset.json does not stop the scan from opening


def names_features(names: dict[int, str], values: list[int]) -> dict[str, list]:
    """A labels layer's features table: one row per label value, with its name (napari shows it under the cursor)."""
    values = sorted({0, *values, *names})
    return {"index": values, "name": ["background" if v == 0 else names.get(v, f"label {v}") for v in values]}


def layer_data(image: sitk.Image, source: str, labels: bool, names: dict[int, str] | None = None,
               name: str | None = None) -> LayerData:
    """napari layer data of a SimpleITK image read from `source`: voxels (z, y, x), spacing and origin as
    scale / translate, the geometry and the source in the metadata."""
    data = sitk.GetArrayFromImage(image)
    kwargs: dict[str, Any] = {
        "name": name or strip_ending(source),
        "scale": tuple(float(s) for s in image.GetSpacing()[::-1]),
        "translate": tuple(float(o) for o in image.GetOrigin()[::-1]),
        "metadata": {SOURCE_KEY: os.path.abspath(source), GEOMETRY_KEY: geometry_metadata(image)},
    }
    if labels:
        names = names or {}
        kwargs["metadata"][NAMES_KEY] = dict(names)
        kwargs["features"] = names_features(names, [int(v) for v in np.unique(data) if v != 0])
    return data, kwargs, "labels" if labels else "image"


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Every path as one layer (image or labels, see the module docstring)."""
    layers = []
    for p in [path] if isinstance(path, (str, os.PathLike)) else list(path):
        p = os.fspath(p)
        source = os.path.dirname(os.path.abspath(p)) if p.lower().endswith(".dcm") else p
        image = read_image(p)
        name = os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else None
        labels = not os.path.isdir(source) and is_label_file(source, image)
        layers.append(layer_data(image, source, labels, label_names_for(source) if labels else None, name))
    return layers


def demo_layers() -> list[LayerData]:
    """npe2 sample data: the bundled hippocampus MR crops (MSD Task04, CC-BY-SA 4.0): the default model's reference
    (image and labels) and its held-out queries."""
    with open(os.path.join(DEMO_FOLDER, "dataset.json")) as f:
        demo = json.load(f)["iris_demo"]
    images = [os.path.join(DEMO_FOLDER, "imagesTr", f"{case}_0000.nii.gz") for case in [demo["reference"],
                                                                                        *demo["queries"]]]
    label = os.path.join(DEMO_FOLDER, "labelsTr", f"{demo['reference']}.nii.gz")
    return read_layers(images) + read_layers(label)


__all__ = ["SUPPORTED_ENDINGS", "SOURCE_KEY", "GEOMETRY_KEY", "NAMES_KEY", "get_reader", "read_layers", "read_image",
           "layer_data", "demo_layers", "names_features"]
