"""What the napari widget runs, without Qt or napari: layers to files, files to IrisPredictor, results to layers.

The widget takes the same path as iris_predict: every layer becomes a file (the file the layer was read from when our
reader opened it and it still holds that file's voxels; otherwise a temporary NIfTI written with the layer's
geometry), the references are parsed into ReferenceCase pairs and encoded by `IrisPredictor.encode_references`, the
task comes from `task_for_strategy` (or `load_task`), the registration fusion is chosen as iris_predict's
`--registration_fusion` chooses it (`apply_fusion`), and each query is segmented by `predict_case`. A labels layer is
always written out, as the user painted it, in the geometry of the image it is paired with.

`segment` is a generator of events (Progress, Note, TaskEncoded, Segmented) for napari's thread_worker: the widget
shows them and can stop it between two of them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from iris_nnu.device import resolve_device
from iris_nnu.errors import IrisInputError, brief
from iris_nnu.files import write_atomic
from iris_nnu.inference.export import label_dtype
from iris_nnu.inference.images import (
    MAX_LABEL_VALUE,
    NIFTI_FORMS_KEY,
    label_to_sitk,
    nifti_forms,
    read_geometry,
    write_segmentation,
)
from iris_nnu.inference.names import structure_name
from iris_nnu.inference.predict import is_task_file, resolve_folds
from iris_nnu.inference.plans import modality_of
from iris_nnu.inference.predictor import IrisPredictor
from iris_nnu.inference.references import ReferenceCase
from iris_nnu.inference.strategies import (AUTO_FUSION, AUTO_POSTPROCESS, AUTO_STEP, AUTO_THRESHOLD, apply_fusion,
                                          check_fusion_source, hidden_edge_line, run_threshold, with_calibration)
from iris_nnu.napari.reader import GEOMETRY_KEY, NAMES_KEY, SOURCE_KEY, names_features

log = logging.getLogger(__name__)

STRATEGIES = ("ensemble", "oneshot")  # the widget's; iris_predict also has retrieval and tune
SEGMENTATION_KEY = "iris_segmentation_of"  # a result layer's metadata: its query's name, source and geometry
SAVE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")  # one-file formats SimpleITK writes
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ layers
@dataclass
class Volume:
    """A layer as iris-nnu sees it: voxels in the layer's (z, y, x) order and their geometry (SimpleITK's x, y, z
    order); `source` is the file or DICOM folder our reader read these voxels from, None for anything else."""

    name: str
    data: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...] = IDENTITY
    source: str | None = None
    names: dict[int, str] = field(default_factory=dict)

    @property
    def geometry(self) -> dict[str, tuple[float, ...]]:
        return {"spacing": tuple(self.spacing), "origin": tuple(self.origin), "direction": tuple(self.direction)}


def layer_names(layer: Any) -> dict[int, str]:
    """{value: name} of a labels layer: our reader's metadata, else a 'name' column of its features table."""
    names = dict((getattr(layer, "metadata", None) or {}).get(NAMES_KEY) or {})
    features = getattr(layer, "features", None)
    if features is not None and "name" in getattr(features, "columns", ()):
        values = features["index"] if "index" in features.columns else range(len(features))
        for value, name in zip(values, features["name"]):
            if int(value) != 0 and isinstance(name, str) and name and not name.startswith("label "):
                names.setdefault(int(value), name)
    return {int(v): str(n) for v, n in names.items()}


def volume_from_layer(layer: Any, copy: bool = False) -> Volume:
    """A napari image or labels layer (read by attribute: napari is not imported) as a Volume; `copy` snapshots the
    voxels (labels the user may go on painting while a run reads them)."""
    name = layer.name
    if getattr(layer, "multiscale", False):
        raise IrisInputError(f"layer {name}: a multiscale layer; open the scan at full resolution")
    if getattr(layer, "rgb", False):
        raise IrisInputError(f"layer {name}: an RGB image; Iris segments scalar 3D scans")
    data = np.array(layer.data) if copy else np.asarray(layer.data)
    if data.ndim != 3:
        raise IrisInputError(f"layer {name}: {data.ndim}D data of shape {data.shape}; Iris segments 3D scans")
    metadata = getattr(layer, "metadata", None) or {}
    geometry = metadata.get(GEOMETRY_KEY)
    scale = tuple(float(s) for s in np.asarray(layer.scale)[::-1])
    if geometry and np.allclose(geometry["spacing"], scale, rtol=1e-6):
        spacing, origin, direction = geometry["spacing"], geometry["origin"], geometry["direction"]
    else:  # not from our reader, or re-scaled since: the layer's own scale and translate, axes as shown
        spacing, origin, direction = scale, tuple(float(t) for t in np.asarray(layer.translate)[::-1]), IDENTITY
    if min(spacing) <= 0:
        raise IrisInputError(f"layer {name}: scale {tuple(layer.scale)}; voxel spacings must be positive")
    source = metadata.get(SOURCE_KEY)
    return Volume(name, data, tuple(spacing), tuple(origin), tuple(direction),
                  source if source and os.path.exists(source) else None, layer_names(layer))


def check_reference(image: Volume, labels: Volume) -> None:
    """A labels layer that can be a reference of this image: same voxel grid, integers >= 0, something labelled."""
    if labels.data.shape != image.data.shape:
        raise IrisInputError(f"labels layer {labels.name}: shape {labels.data.shape} differs from image layer "
                             f"{image.name}'s {image.data.shape}; draw the labels on that image (napari's new labels "
                             f"layer over it has its shape)")
    if labels.data.dtype.kind not in "uib":
        raise IrisInputError(f"labels layer {labels.name}: voxels of type {labels.data.dtype}; labels are integers")
    low, high = (int(labels.data.min()), int(labels.data.max())) if labels.data.size else (0, 0)
    if low < 0:
        raise IrisInputError(f"labels layer {labels.name}: negative label value {low}; labels are 0 (background) "
                             f"and positive integers")
    if high >= MAX_LABEL_VALUE:
        raise IrisInputError(f"labels layer {labels.name}: label value {high} is too large (below 2**32)")
    if high == 0:
        raise IrisInputError(f"labels layer {labels.name}: no voxel is labelled (all 0); paint the structures first")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"


def write_volume(data: np.ndarray, geometry: dict, path: str) -> str:
    """`data` (z, y, x) as an image file with this geometry, written atomically."""
    if data.dtype == bool or data.dtype.kind == "f" and data.dtype != np.float64:
        data = data.astype(np.float32 if data.dtype.kind == "f" else np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data))
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, True))
    return path


def source_matches(volume: Volume) -> bool:
    """Whether the volume's source file still holds its voxel grid (a layer can be given other data)."""
    return volume.source is not None and tuple(read_geometry(volume.source).size) == volume.data.shape[::-1]


def image_file(volume: Volume, folder: str, index: int = 0) -> str:
    """The image file iris-nnu reads for this layer: its source, else a temporary NIfTI in `folder`."""
    if source_matches(volume):
        return volume.source
    return write_volume(volume.data, volume.geometry,
                        os.path.join(folder, f"image{index}_{safe_name(volume.name)}_0000.nii.gz"))


def image_geometry(image: Volume) -> dict:
    """The geometry iris-nnu reads for an image layer: its source's header, else the layer's."""
    if source_matches(image):
        g = read_geometry(image.source)
        return {"spacing": g.spacing, "origin": g.origin, "direction": g.direction}
    return image.geometry


def label_file(labels: Volume, image: Volume, folder: str, index: int = 0) -> str:
    """The labels layer as painted, as a temporary NIfTI in the geometry of its image (checked first)."""
    check_reference(image, labels)
    path = os.path.join(folder, f"label{index}_{safe_name(labels.name)}.nii.gz")
    properties = {"sitk_stuff": image_geometry(image)}
    write_atomic(path, lambda tmp: sitk.WriteImage(label_to_sitk(labels.data, properties), tmp, True))
    return path


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """What the widget's controls choose; the names are iris_predict's options."""

    model_folder: str | None = None  # -m; None: the bundled default model
    folds: list[str] = field(default_factory=lambda: ["0"])  # -f
    strategy: str = "ensemble"  # --strategy
    classes: list[int] | None = None  # --classes; None: every label value of the references
    tta: bool = False  # --tta
    device: str | None = None  # -device; None: cuda when available, else cpu
    registration_fusion: str = AUTO_FUSION  # --registration_fusion


def parse_classes(text: str) -> list[int] | None:
    """'1 2' or '1, 2' -> [1, 2]; '' or 'all' -> None (every label value)."""
    words = text.replace(",", " ").split()
    if not words or words == ["all"]:
        return None
    try:
        values = [int(w) for w in words]
    except ValueError:
        raise IrisInputError(f"classes '{text}': give label values, e.g. 1 2, or all") from None
    if min(values) <= 0:
        raise IrisInputError(f"classes '{text}': label values are positive (0 is background)")
    return sorted(set(values))


def parse_folds(text: str) -> list[str]:
    """'0', '0 1 2' or 'all' (every fold_F folder of the model)."""
    words = text.replace(",", " ").split() or ["0"]
    if words != ["all"] and not all(w.isdigit() for w in words):
        raise IrisInputError(f"folds '{text}': give fold numbers, e.g. 0 or 0 1 2, or all")
    return words


# ------------------------------------------------------------------------------------------ events
@dataclass
class Progress:
    done: int
    total: int
    message: str


@dataclass
class Note:
    """A line for the user: level info, warning or error (a failed query; the run goes on)."""

    message: str
    level: str = "info"


@dataclass
class TaskEncoded:
    """The task of the run: `pool` as encode_references or load_task gave it, for 'save task'."""

    pool: Any
    names: dict[int, str]
    classes: list[int]
    description: str


@dataclass
class Segmented:
    """One query's segmentation: label values, in the query layer's (z, y, x) voxels."""

    query: str
    segmentation: np.ndarray
    classes: list[int]
    names: dict[int, str]


def one_line(error: BaseException) -> str:
    """An error as the one line the user sees (IrisInputError's own text, else its type and first line)."""
    text = str(error) if isinstance(error, IrisInputError) else f"{type(error).__name__}: {brief(error)}"
    return " ".join(text.split())


def reference_names(references: Sequence[tuple[Volume, Volume]]) -> dict[int, str]:
    """Names of the references' label values; the first reference naming a value wins (as iris_predict)."""
    names: dict[int, str] = {}
    for _, labels in reversed(references):
        names.update(labels.names)
    return names


def _as_label_dtype(segmentation: np.ndarray) -> np.ndarray:
    return segmentation.astype(label_dtype(int(segmentation.max(initial=0))), copy=False)


def segment(settings: Settings, references: Sequence[tuple[Volume, Volume]], queries: Sequence[Volume],
            workdir: str, task_file: str | None = None) -> Iterator[Progress | Note | TaskEncoded | Segmented]:
    """Encode the references (image, labels) or load `task_file`, then segment each query, as iris_predict does.

    Temporary files go to `workdir` (the caller removes it). Errors end the run with one Note(level='error'); a query
    that fails is one such Note and the others still run."""
    total = 2 + len(queries)
    try:
        yield Progress(0, total, "loading the model")
        predictor = IrisPredictor(device=resolve_device(settings.device), use_mirroring=settings.tta)
        folds = resolve_folds(settings.folds, settings.model_folder)
        predictor.initialize_from_model_folder(settings.model_folder, folds)
        if predictor.num_channels != 1:
            raise IrisInputError(f"the model takes {predictor.num_channels} channels per scan; the napari plugin "
                                 f"segments single-channel scans (use iris_predict)")
        if settings.tta and not predictor.mirror_flips:
            yield Note("the model was trained without mirroring: TTA ignored", "warning")
        if task_file:
            check_fusion_source(settings.registration_fusion, True, "registration fusion")
            yield Progress(1, total, f"loading task {os.path.basename(task_file)}")
            pool = predictor.load_task(task_file, settings.classes)
            if predictor.mirror_flips and not pool.mirrored:
                raise IrisInputError(f"{task_file}: the task file holds no mirrored embeddings for TTA; save it from "
                                     f"a run with TTA, or segment without TTA")
            if queries:  # as iris_predict's --modality auto with --task: the first query says
                predictor.use_modality(modality_of(queries[0].data))
            encoded, cases, names = None, [], dict(pool.names or {})
            description = f"task file {os.path.basename(task_file)}"
        else:
            if not references:
                raise IrisInputError("no reference: pick an image layer and its labels layer (or load a task file)")
            yield Progress(1, total, f"encoding {len(references)} reference(s)")
            cases = [ReferenceCase(labels.name, [image_file(image, workdir, i)], label_file(labels, image, workdir, i))
                     for i, (image, labels) in enumerate(references)]
            modality, line = predictor.detect_modality(cases[0].images)  # as iris_predict's --modality auto
            predictor.use_modality(modality)
            yield Note(line)
            fusion = settings.registration_fusion if queries else "off"  # no query to fuse: the task alone
            if fusion == AUTO_FUSION and len(cases) > 1:
                yield Progress(1, total, f"measuring registration fusion: {cases[1].name} segmented from "
                                         f"{cases[0].name} by the network, fused, and by the registration")
            line = apply_fusion(predictor, fusion, cases, settings.classes)
            if line:
                yield Note(line)
            encoded = predictor.encode_references(cases, settings.classes)
            for label, values in encoded.lost.items():
                yield Note(f"{os.path.basename(label)}: label value(s) {' '.join(map(str, values))} vanish at the "
                           f"model's spacing", "warning")
            line = hidden_edge_line(predictor, encoded.classes)
            if line:
                yield Note(line)
            pool, names = encoded.pool, reference_names(references)
            description = f"{len(cases)} reference(s): {', '.join(labels.name for _, labels in references)}"
        task, _ = predictor.task_for_strategy(pool, settings.strategy, encoded)
        if cases:
            yield Progress(1, total, "calibrating the window step and decision threshold on the references")
        # as iris_predict's defaults (-step_size auto, --threshold auto, --postprocess auto); a saved task records
        # all three
        predictor.decision_threshold, line = run_threshold(predictor, AUTO_THRESHOLD, task, cases, AUTO_STEP,
                                                           AUTO_POSTPROCESS)
        if line:
            yield Note(line)
        pool = with_calibration(pool, predictor.decision_threshold, predictor.tile_step_size,
                                predictor.largest_component)
        classes = [int(c) for c in predictor.per_fold(task)[0].classes]
        yield TaskEncoded(pool, names, classes, description)
        segmented = 0
        for i, query in enumerate(queries):
            yield Progress(2 + i, total, f"segmenting {query.name}")
            try:
                result = predictor.predict_case([image_file(query, workdir, len(references) + i)], task)
            except Exception as e:  # noqa: BLE001 - a failed query is reported; the others still get theirs
                log.debug("query %s failed", query.name, exc_info=True)
                yield Note(f"query {query.name}: {one_line(e)}", "error")
                continue
            for warning in result.warnings:
                yield Note(f"query {query.name}: {warning}", "warning")
            segmented += 1
            yield Segmented(query.name, _as_label_dtype(result.segmentation), classes, names)
        yield Progress(total, total, f"done: {segmented} of {len(queries)} queries segmented (classes "
                                     f"{' '.join(map(str, classes))})" if queries else
                       f"done: task encoded (classes {' '.join(map(str, classes))}); Save task writes it")
    except Exception as e:  # noqa: BLE001 - shown as one line, never a traceback
        log.debug("the run failed", exc_info=True)
        yield Note(one_line(e), "error")


# ------------------------------------------------------------------------------------------ results
def segmentation_layer_kwargs(event: Segmented, query: Volume) -> dict[str, Any]:
    """Keyword arguments of the labels layer of a result (the widget adds the query layer's transform)."""
    return {"name": f"{event.query} segmentation",
            "metadata": {SEGMENTATION_KEY: {"query": event.query, "source": query.source, "geometry": query.geometry},
                         NAMES_KEY: {int(v): event.names.get(v) or structure_name(v, event.names)
                                     for v in event.classes}},
            "features": names_features(event.names, event.classes)}


def protected_paths(layers: Sequence[Any]) -> set[str]:
    """Files the plugin must never overwrite: every layer's source (ours, or napari's layer.source.path)."""
    paths = set()
    for layer in layers:
        for path in ((getattr(layer, "metadata", None) or {}).get(SOURCE_KEY),
                     getattr(getattr(layer, "source", None), "path", None)):
            if path:
                paths.add(os.path.realpath(path))
    return paths


def check_target(path: str, protected: set[str], what: str) -> None:
    if os.path.realpath(path) in protected:
        raise IrisInputError(f"{path}: an input of the open layers; {what} never overwrites it (choose another name)")
    if os.path.isdir(path):
        raise IrisInputError(f"{path}: a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise IrisInputError(f"{path}: folder {folder} does not exist")


def save_segmentation(labels: Any, path: str, protected: set[str] = frozenset()) -> str:
    """Write a labels layer (a result, or any labels layer) in its query's geometry with iris-nnu's writer: the
    geometry the query was read in (a NIfTI query's qform and sform too), label values as they are."""
    if not path.lower().endswith(SAVE_ENDINGS):
        raise IrisInputError(f"{path}: save a segmentation as {', '.join(SAVE_ENDINGS)}")
    check_target(path, protected, "save segmentation")
    metadata = getattr(labels, "metadata", None) or {}
    of = metadata.get(SEGMENTATION_KEY)
    volume = volume_from_layer(labels, copy=True)
    if volume.data.dtype.kind not in "uib" or (volume.data.size and volume.data.min() < 0):
        raise IrisInputError(f"labels layer {labels.name}: labels must be non-negative integers to be saved")
    geometry, source = (of["geometry"], of["source"]) if of else (volume.geometry, volume.source)
    properties: dict[str, Any] = {"sitk_stuff": dict(geometry), "spacing": list(geometry["spacing"][::-1])}
    if source and os.path.isfile(source) and tuple(read_geometry(source).size) == volume.data.shape[::-1]:
        g = read_geometry(source)  # the header as iris_predict reads it (the layer may hold rounded copies)
        properties["sitk_stuff"] = {"spacing": g.spacing, "origin": g.origin, "direction": g.direction}
        forms = nifti_forms(source)
        if forms is not None and path.lower().endswith((".nii", ".nii.gz")):
            properties[NIFTI_FORMS_KEY] = forms
    write_segmentation(_as_label_dtype(volume.data), path, properties, SimpleITKIO())
    return path


def save_task(pool: Any, names: dict[int, str], path: str, protected: set[str] = frozenset()) -> str:
    """Write an encoded task as iris_predict --save_task does (its names kept); an existing file that is not a task
    file is never replaced."""
    if isinstance(pool, (list, tuple)):
        raise IrisInputError("a task file holds one fold's embedding; this run is a fold ensemble (folds "
                             "0 1 ...): save the task from a single-fold run")
    check_target(path, protected, "save task")
    if os.path.exists(path) and not is_task_file(path):
        raise IrisInputError(f"{path}: exists and is not a task file; it is never replaced (choose another name)")
    dataclasses.replace(pool, names=names or None).save(path)
    return path
