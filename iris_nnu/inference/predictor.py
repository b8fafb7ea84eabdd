"""IrisPredictor: reference-conditioned segmentation with nnU-Net's preprocessing, window helpers and export.

What stays nnU-Net's: preprocessing (transpose, crop to non-zero, normalise, resample), the sliding window's steps,
padding and Gaussian weights (sliding_window.py), and the resampling/crop/transpose reversal of the export. What is Iris's: the network also takes
a task (the encoded references); mirroring TTA flips the references with the query (each flip has its own task
tokens, encoded from equally flipped reference crops: flipping the query alone would move left/right classes to
the other side); the output is K independent sigmoid maps decided per voxel (see export.py).

Strategies (Iris, "Inference strategies"):
- oneshot: one reference; ensemble: per class, the mean of the references' embeddings where the class is present;
- retrieval: segment with the ensemble, encode the query's own predicted structures, keep per class the
  reference(s) whose embedding is most similar (cosine), segment again;
- tune: the network frozen, only the task embedding is optimised on the references (Dice + BCE, as in training).

Fold ensemble (nnU-Net's `-f 0 1 2 3 4`): the predictor holds one network per fold; a task is then a list with one
TaskEmbedding per fold network (each fold encodes the references itself), and a query's per-class probability is
the mean of the folds' sigmoid maps.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter

from iris_nnu.errors import IrisInputError, brief
from iris_nnu.inference.alignment import PRIOR_ALIGNMENTS, AlignmentAnchor, aligned_frame, priors_onto
from iris_nnu.inference.export import (
    DecisionThreshold,
    Winner,
    indices_to_values,
    keep_largest_components,
    resample_to_cropped_shape,
    revert_crop_and_transpose,
    threshold_logits,
)
from iris_nnu.inference.images import (
    read_geometry,
    Query,
    find_queries,
    label_to_sitk,
    read_images,
    reader_writer_for,
    sitk_to_array,
    strip_ending,
)
from iris_nnu.inference.plans import (AIR_PERCENTILE, BODY_BOX_KEY, ORIGINAL_BODY_BOX_KEY, RunPreprocessing, air_level,
                                      inference_plans, modality_of)
from iris_nnu.inference.registration import RegisteredLabels, RegistrationAtlas, registered_label_maps, slabs
from iris_nnu.inference.references import (
    Crop,
    PreparedReference,
    ReferenceCase,
    prepare_reference,
    remap_crops,
    remap_positions,
    structure_crops,
)
from iris_nnu.inference.runner import run_queries, write_result
from iris_nnu.inference.segmenter import (DEFAULT_PRECISION, LOGIT_LIMIT, MIN_STEP_SIZE, Segmenter, mirror_flips,
                                         window_precision)
from iris_nnu.inference.strategies import (
    DEFAULT_STEP_SIZE,
    DEFAULT_THRESHOLD,
    DEFAULT_TUNE_LR,
    DEFAULT_TUNE_STEPS,
    HIDDEN_EDGE_FACTOR,
    HIDDEN_EDGE_SHARE,
    REGISTRATION_WEIGHT,
    STRATEGIES,
    select_references,
    tune_task,
)
from iris_nnu.io.model_folder import (
    DEFAULT_CHECKPOINT,
    load_model_folder,
)
from iris_nnu.model import IrisNetwork, TaskEmbedding, TaskMismatchError
from iris_nnu.model.task import checked_threshold
from iris_nnu.model.position import ScanFrame
from iris_nnu.orientation import orientation_code, reorient, stored_properties, to_storage
from iris_nnu.preprocessing.frames import SCAN_FRAME_KEY, scan_frame
from iris_nnu.preprocessing.planner import CONFIGURATION, run_spacing

# Class maps of one pass (fp16, preprocessed space) and export chunks stay under this; beyond it classes go in
# several passes. A pass decodes all its classes in ONE forward per window.
DEFAULT_MAP_MEMORY_GB = 1.0
# How a query meets its references' position priors by default (inference/alignment.py; measured in README Results)
DEFAULT_PRIOR_ALIGNMENT = "affine"


def fuse_with_atlas(logits: np.ndarray, atlas: np.ndarray, weight: float | np.ndarray = REGISTRATION_WEIGHT,
                    ) -> np.ndarray:
    """The network's logits with the registration's evidence added, logits + weight * (2 * atlas - 1) (both (K, ...),
    float32; `weight` one for all classes or one per class, (K,)): a voxel the registered label covers gains `weight`,
    one it leaves out loses it, and the network's decision threshold still decides, so a confident network outvotes a
    registration that went astray. A class of weight inf is the registered label alone (its logit). In place: returns
    `logits`, changed (a brain's 85 classes are 1.8 GB; read in slabs, in one pass where both arrays share a layout,
    as registered_label_maps and export.resample_to_cropped_shape make them)."""
    weights = np.broadcast_to(np.asarray(weight, dtype=np.float32), (logits.shape[0],))
    alone = np.isinf(weights)
    finite = np.where(alone, 0, weights).astype(np.float32).reshape(-1, *[1] * (logits.ndim - 1))
    for slab in slabs(logits.shape) if finite.any() else ():  # none: every class 0 or inf (registration alone)
        evidence = atlas[slab] * (2 * finite)
        evidence -= finite
        logits[slab] += evidence
    for k in np.flatnonzero(alone):  # the registered label's own logit
        logits[k] = torch.logit(torch.from_numpy(np.ascontiguousarray(atlas[k], dtype=np.float32))).clamp_(
            -LOGIT_LIMIT, LOGIT_LIMIT).numpy()
    return logits


# A task of a run: one TaskEmbedding, or for a fold ensemble one per fold network (in the predictor's fold order)
Tasks = TaskEmbedding | Sequence[TaskEmbedding]


@dataclass
class EncodedReferences:
    """The references of a run: their embeddings (pools: B = references, one per fold network) and their crops."""

    pools: list[TaskEmbedding]
    names: list[str]
    crops: list[list[Crop]]  # per reference; labels index the pools' classes (i = classes[i - 1])
    lost: dict[str, list[int]] = field(default_factory=dict)  # reference -> values lost by resampling
    anchors: list[AlignmentAnchor] = field(default_factory=list)  # per reference, for prior_alignment "affine"
    atlases: list[RegistrationAtlas] = field(default_factory=list)  # per reference, for registration_fusion

    @property
    def pool(self) -> Tasks:
        """The embeddings: one TaskEmbedding, or a list with one per fold network of a fold ensemble."""
        return self.pools[0] if len(self.pools) == 1 else list(self.pools)

    @property
    def classes(self) -> list[int]:
        return self.pools[0].classes


@dataclass
class CaseResult:
    """A segmented query: label values in the query's own geometry, and what the run learned about it."""

    segmentation: np.ndarray
    properties: dict
    reader_writer: BaseReaderWriter
    classes: list[int]
    probabilities: np.ndarray | None = None  # (K, ...) float16, per class, same geometry
    warnings: list[str] = field(default_factory=list)
    retrieved: dict[int, list[int]] | None = None  # retrieval: class value -> indices of the chosen references
    # (a fold ensemble: those any fold chose)


@dataclass
class QuerySegmentation:
    """What segment_preprocessed made, each only when asked: class indices (i = task.classes[i - 1], 0 background)
    in the query's original geometry, per-class probabilities (K, ...) float16 there, class indices in the
    preprocessed (model) space, the winning logits in the original geometry."""

    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    preprocessed_labels: np.ndarray | None = None
    scores: np.ndarray | None = None  # the winning class's logit per voxel, original geometry (float32)


@dataclass
class PreparedQuery:
    """A query read and preprocessed (the model's space), its properties, reader and input warnings."""

    data: np.ndarray
    properties: dict
    reader_writer: BaseReaderWriter
    warnings: list[str]
    original: tuple[np.ndarray, tuple[float, ...]] | None = None  # keep_original: RunPreprocessing.cropped_original


@dataclass
class QueryPreparation:
    """Reads and preprocesses queries as a run's predictor does; picklable, so worker processes can run it."""

    preprocessing: RunPreprocessing
    reader_writer_class: type[BaseReaderWriter]
    modality: str
    num_channels: int
    orientation: str | None = None  # the run's voxel order (orientation.py); None: as stored
    keep_original: bool = False  # also the first channel on its cropped original grid (registration fusion)

    def __call__(self, images: Sequence[str]) -> PreparedQuery:
        """Channel files (or a DICOM folder) of one query."""
        reader_writer = reader_writer_for(images[0], self.reader_writer_class)
        data, properties = read_images(list(images), reader_writer)
        return self.array(data, properties, reader_writer)

    def array(self, data: np.ndarray, properties: dict, reader_writer: BaseReaderWriter) -> PreparedQuery:
        """(C, Z, Y, X) as nnU-Net's readers return it, and its properties (not modified)."""
        if data.ndim != 4 or data.shape[0] != self.num_channels:
            raise IrisInputError(f"query array must be (C={self.num_channels}, Z, Y, X), got {tuple(data.shape)}")
        properties = copy.deepcopy(properties)  # nnU-Net's preprocessing writes into it
        if "sitk_stuff" in properties:  # SimpleITK geometry (the plans' reader, DICOM): one voxel order per run
            data, properties, _ = reorient(data, properties, self.orientation)
        warnings = self.preprocessing.input_warnings(data, properties, self.modality)
        first = data[0]
        data, _, properties = self.preprocessing(data, None, properties)
        original = self.preprocessing.cropped_original(first, properties) if self.keep_original else None
        return PreparedQuery(data, properties, reader_writer, warnings, original)


def field_of_view_warnings(task: TaskEmbedding, properties: dict) -> list[str]:
    """A query whose body is far larger or smaller than the references' along some axis (a crop of another region,
    a padded scan, another field of view): the position prior then misleads. Pairs of cases of one development
    member differ by at most 1.37x (hippocampus crops), 1.17x (brains), 1.23x (abdomen) and 2.02x (head-and-neck CT,
    cut differently per patient): FIELD_OF_VIEW_WARNING_FACTOR lies above them."""
    if task.extent is None or SCAN_FRAME_KEY not in properties or task.positions is None:
        return []
    query = np.array(scan_frame(properties).extent)
    ratio = float(np.max(np.maximum(query / np.array(task.extent), np.array(task.extent) / query)))
    if ratio <= FIELD_OF_VIEW_WARNING_FACTOR:
        return []
    return [f"its body spans {ratio:.1f}x more or less than the references' along one axis (another field of view, a "
            f"crop of another region, or padding?): the position prior assumes query and references cover the same "
            f"anatomy; consider --no_position_prior"]


FIELD_OF_VIEW_WARNING_FACTOR = 2.5  # see field_of_view_warnings


class IrisPredictor:
    """Segment queries given references (or a task file) with an Iris model; see the module docstring.

    The public facade: nnU-Net's method names and argument order (`initialize_from_model_folder`,
    `predict_single_npy_array`, `predict_from_files`, ...), each taking the task as an argument. It holds the run's
    preprocessing and fold networks; segmentation itself is a `Segmenter` (segmenter.py) built per call.

    Args:
        tile_step_size: window step as a fraction of the patch (nnU-Net's, whose default is 0.5; here
            strategies.DEFAULT_STEP_SIZE, iris_predict's where the references do not ask for denser windows).
        use_mirroring: mirrored TTA (every flip of the model's mirroring axes, query and references together).
        device: where the networks run.
        modality: "CT" or "other": how queries are checked (input_warnings) when the plans do not say.
        classes_per_pass: classes decoded in one pass (None: as many as `map_memory_gb` allows).
        map_memory_gb: memory for the class maps of one pass and the export chunks.
        largest_component: keep each class's largest connected component in the output (True), or only these class
            values' (strategies.run_threshold picks the run's with --postprocess auto: those whose largest component
            alone segments the references better).
        decision_threshold: a voxel gets its most probable class where that probability exceeds this, else
            background: one probability, or one per class value (strategies.run_threshold picks the run's: calibrated
            per class on the references by default).
        position_prior: False segments from the image alone, ignoring where the references hold each class
            (model/position.py).
        prior_alignment: how a query is matched to its references' position priors: "affine" registers it to the
            first reference encoded by `encode_references` (inference/alignment.py; the other references' priors are
            carried onto the first's grid at encoding), "frames" puts the two bodies' frames onto each other (also
            what a task file, which holds no image, gets).
        registration_fusion: add to each class's logit the evidence of the references' labels carried onto the query
            by a registration (registration.registered_label_maps; references encoded by `encode_references`, not a
            task file): `registration_weight` logits where the registered label covers a voxel, minus as much where
            it does not (fuse_with_atlas; REGISTRATION_WEIGHT by default), decided at the run's decision threshold;
            inf: the registered label alone, decided at 0.5, and the network is not run on the queries.
            `class_registration_weights` (attribute, None by default) sets the weight per class value instead
            (strategies.set_fusion, --registration_fusion auto decided per class): a class absent from it, or at
            weight 0, is the network's alone. A fused class whose edge the references' images hide takes
            `hidden_edge_factor` (attribute, HIDDEN_EDGE_FACTOR; 1: none) times its weight (fusion_weights).
            `registration_floor` (attribute, None by
            default): a query whose registration looks less like it than this (registration_similarity) is segmented
            by the network alone, at the run's decision threshold (set_fusion; --registration_fusion auto sets it
            from the references).
        precision: how the windows compute on a CPU (segmenter.PRECISIONS): "auto" is bfloat16 on a CPU with AMX
            tiles and float32 elsewhere; CUDA uses float16 autocast.
        verbose: unused (nnU-Net's argument, kept for its argument order).
        allow_tqdm: progress bars over the queries of predict_from_files.
    """

    def __init__(self, tile_step_size: float = DEFAULT_STEP_SIZE, use_mirroring: bool = False,
                 device: torch.device | str = "cpu", modality: str = "other", classes_per_pass: int | None = None,
                 map_memory_gb: float = DEFAULT_MAP_MEMORY_GB, largest_component: bool | Collection[int] = False,
                 position_prior: bool = True, verbose: bool = False, allow_tqdm: bool = False,
                 decision_threshold: DecisionThreshold = DEFAULT_THRESHOLD,
                 prior_alignment: str = DEFAULT_PRIOR_ALIGNMENT,
                 registration_fusion: bool = False, registration_weight: float = REGISTRATION_WEIGHT,
                 precision: str = DEFAULT_PRECISION):
        if not MIN_STEP_SIZE <= tile_step_size <= 1:
            raise ValueError(f"step size must be in [{MIN_STEP_SIZE}, 1], got {tile_step_size}")
        if classes_per_pass is not None and classes_per_pass < 1:
            raise ValueError(f"classes_per_pass must be at least 1, got {classes_per_pass}")
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self.device = torch.device(device)
        self.modality = modality
        self.classes_per_pass = classes_per_pass
        self.largest_component = largest_component
        self.decision_threshold = checked_threshold(decision_threshold)
        self.position_prior = position_prior
        if prior_alignment not in PRIOR_ALIGNMENTS:
            raise ValueError(f"prior_alignment must be one of {PRIOR_ALIGNMENTS}, got {prior_alignment!r}")
        self.prior_alignment = prior_alignment
        self.registration_fusion = registration_fusion
        if not registration_weight >= 0:
            raise ValueError(f"registration_weight must be 0 or more (inf: the registration alone), got "
                             f"{registration_weight}")
        self.registration_weight = registration_weight
        window_precision(precision, device)  # refuses an unknown one
        self.precision = precision
        self.class_registration_weights: dict[int, float] | None = None
        self.hidden_edge_factor = HIDDEN_EDGE_FACTOR
        self.registration_floor: float | None = None
        # the references queries are registered to (encode_references sets them; a loaded task has none)
        self.alignment_anchors: list[AlignmentAnchor] = []
        self.registration_atlases: list[RegistrationAtlas] = []  # likewise, for registration_fusion
        # the last encode_references call's prepared references, by what made them: --registration_fusion auto
        # encodes the first reference to measure the fusion, then the run's references (that one again)
        self._prepared: dict[tuple, PreparedReference] = {}
        self.verbose = verbose
        self.allow_tqdm = allow_tqdm
        self.map_memory_bytes = map_memory_gb * 1024**3
        self.preprocessing: RunPreprocessing | None = None
        self.fold_networks: list[IrisNetwork] = []
        self.folds: list[str] = []
        self.allowed_mirroring_axes: tuple[int, ...] | None = None

    # ------------------------------------------------------------------------------------ set-up
    def initialize_from_model_folder(self, folder: str | None, fold: int | str | Sequence[int | str] = 0,
                                     checkpoint_name: str = DEFAULT_CHECKPOINT) -> None:
        """Load an iris_train model folder (nnU-Net's own loader imports trainers, which needs torchvision); several
        folds make a fold ensemble (tasks are then lists, one TaskEmbedding per fold)."""
        folds = [fold] if isinstance(fold, (int, str)) else list(fold)
        if not folds:
            raise IrisInputError("no fold given (-f)")
        models = [load_model_folder(folder, f, checkpoint_name) for f in folds]
        first = models[0]
        self.initialize(first.network, first.plans, first.dataset_json, first.inference_allowed_mirroring_axes)
        self.fold_networks = [m.network.to(self.device).eval() for m in models]
        self.folds = [m.fold for m in models]

    def initialize(self, network: IrisNetwork, plans: dict, dataset_json: dict,
                   inference_allowed_mirroring_axes: tuple[int, ...] | None = (0, 1, 2)) -> None:
        """Use this network with its joint plan and dataset.json (e.g. from a trainer)."""
        num_channels = len(dataset_json["channel_names"])
        self.preprocessing = RunPreprocessing(inference_plans(plans, self.modality, num_channels))
        self.plans_manager = self.preprocessing.plans_manager
        self.configuration_manager = self.preprocessing.configuration_manager
        self.dataset_json = dataset_json
        self.allowed_mirroring_axes = inference_allowed_mirroring_axes
        self.fold_networks, self.folds = [network.to(self.device).eval()], ["0"]
        self.joint_plans = plans
        self.num_channels = num_channels
        self.spacing = float(self.configuration_manager.spacing[0])
        # voxel order of the run (orientation.py): the model's (its plans'), or for models planned before the
        # rule, the run's first reference's
        self.model_orientation: str | None = plans.get("iris", {}).get("orientation")
        self.orientation: str | None = self.model_orientation
        self.patch_size = tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def network(self) -> IrisNetwork:
        """The first fold's network (the only one outside a fold ensemble)."""
        return self.fold_networks[0]

    def use_spacing(self, spacing: float | None) -> None:
        """Preprocess and export at this isotropic spacing (mm; None: the plan's finest). A task records the
        spacing its references were encoded at, and its queries must be segmented at the same."""
        spacing = float(self.joint_plans["configurations"][CONFIGURATION]["spacing"][0] if spacing is None
                        else spacing)
        if spacing == self.spacing:
            return
        self.preprocessing = RunPreprocessing(inference_plans(self.joint_plans, self.modality, self.num_channels,
                                                              spacing))
        self.plans_manager = self.preprocessing.plans_manager
        self.configuration_manager = self.preprocessing.configuration_manager
        self.spacing = spacing

    def use_modality(self, modality: str) -> None:
        """Normalise the run's queries and references as `modality` ("CT" or "other"; inference_plans)."""
        if modality == self.modality:
            return
        self.preprocessing = RunPreprocessing(inference_plans(self.joint_plans, modality, self.num_channels,
                                                              self.spacing))
        self.plans_manager = self.preprocessing.plans_manager
        self.configuration_manager = self.preprocessing.configuration_manager
        self.modality = modality

    def detect_modality(self, images: Sequence[str]) -> tuple[str, str]:
        """(modality_of the first channel of these files, a line saying why)."""
        data, _ = read_images([images[0]], reader_writer_for(images[0], self.reader_writer_class))
        low = air_level(data[0])  # computed once, for the decision and the line (0.2 s on a 24M-voxel CT)
        modality = modality_of(data[0], low)
        if modality == "CT":
            return modality, (f"modality CT: {images[0]} holds air in Hounsfield units ({AIR_PERCENTILE}th percentile "
                              f"{low:.0f}); --modality other to override")
        return modality, (f"modality other (MR-like, each image normalised by its own percentiles): {images[0]} holds "
                          f"no air in Hounsfield units; --modality CT to override")

    def follow(self, task: Tasks) -> None:
        """Preprocess the queries of `task` as its references were: spacing and voxel order."""
        first = self.per_fold(task)[0]
        self.use_spacing(first.spacing)
        self.orientation = first.orientation or self.model_orientation

    @property
    def reader_writer_class(self) -> type[BaseReaderWriter]:
        return self.plans_manager.image_reader_writer_class

    # ------------------------------------------------------------------------------------ folds
    @property
    def num_folds(self) -> int:
        return len(self.fold_networks)

    def per_fold(self, task: Tasks) -> list[TaskEmbedding]:
        """The task as one TaskEmbedding per fold network."""
        tasks = [task] if isinstance(task, TaskEmbedding) else list(task)
        if len(tasks) != self.num_folds:
            raise ValueError(f"{len(tasks)} task(s) for {self.num_folds} fold network(s): give one per fold")
        return tasks

    def for_folds(self, make: Callable[[int], TaskEmbedding]) -> Tasks:
        """`make(i)` for each fold i, as one task (a single fold) or a list (a fold ensemble)."""
        tasks = [make(i) for i in range(self.num_folds)]
        return tasks[0] if len(tasks) == 1 else tasks

    # ------------------------------------------------------------------------------------ tasks
    @property
    def mirror_flips(self) -> list[tuple[int, ...]]:
        """The flips of mirrored TTA (every combination of the model's mirroring axes); none without TTA."""
        return mirror_flips(self.allowed_mirroring_axes or ()) if self.use_mirroring else []

    def encode_crops(self, crops: Sequence[Crop], classes: Sequence[int],
                     positions: torch.Tensor | None = None, mirrored: bool = True, fold: int = 0) -> TaskEmbedding:
        """One embedding (B = 1) by fold `fold`'s network from crops of one image; crop labels index `classes`
        (i = classes[i - 1]); `positions` (len(classes), G, G, G): the classes' position priors in the whole image
        (position_prior). With mirrored TTA (and `mirrored`) the task also holds the tokens of the crops flipped by
        each TTA flip; the priors stay: a flipped window keeps its voxels' scan coordinates."""
        network = self.fold_networks[fold]
        parts = []
        with torch.no_grad():
            for crop in crops:
                image = torch.from_numpy(crop.image)[None].to(self.device)
                masks = torch.from_numpy(np.stack([crop.labels == i for i in crop.encode]))[None].to(
                    self.device, torch.float32)
                prior = None if positions is None else positions[[i - 1 for i in crop.encode]][None].to(self.device)
                crop_classes = [classes[i - 1] for i in crop.encode]
                task = network.encode_task(image, masks, classes=crop_classes, positions=prior)
                flips = {axes: network.encode_task(torch.flip(image, [a + 2 for a in axes]),
                                                   torch.flip(masks, [a + 2 for a in axes]),
                                                   classes=crop_classes, positions=prior).tokens
                         for axes in (self.mirror_flips if mirrored else [])}
                parts.append(dataclasses.replace(task, mirrored=flips or None))
        return TaskEmbedding.concatenate(parts).mean()

    @property
    def position_grid(self) -> int:
        """Cells per axis of the model's position prior (0: a model without one)."""
        return int(getattr(self.network, "position_grid", 0))

    def encode_references(self, references: Sequence[ReferenceCase], classes: Sequence[int] | None = None,
                          ) -> EncodedReferences:
        """Check, preprocess, crop and encode the references once; `classes` (label values) picks a subset."""
        if not references:
            raise IrisInputError("no references given")
        wanted = sorted(set(int(c) for c in classes)) if classes else None
        # the spacing rule of the plan (planner.run_spacing) on the references' voxel sizes
        geometries = [read_geometry(case.images[0]) for case in references]
        self.use_spacing(run_spacing(self.joint_plans, [g.spacing for g in geometries]))
        self.orientation = self.model_orientation or orientation_code(geometries[0].direction)
        keyed = [self._prepare_reference(case, wanted) for case in references]
        self._prepared = dict(keyed)
        prepared = [p for _, p in keyed]
        used = [p for p in prepared if p.values]
        found = sorted(set().union(*(p.values for p in used))) if used else []
        if wanted:
            missing = [c for c in wanted if c not in found]
            if missing:
                held = sorted(set().union(*(p.held for p in prepared)))
                vanished = [c for c in missing if c in held]
                raise IrisInputError(f"--classes {' '.join(map(str, missing))}: absent from the references "
                                     f"({', '.join(p.case.label for p in prepared)}), which hold "
                                     f"{' '.join(map(str, held))}" + (
                                         f"; {' '.join(map(str, vanished))} vanish at the model's spacing"
                                         if vanished else ""))
        run_classes = wanted or found
        frames = [p.crops[0].frame for p in used if p.crops and p.crops[0].frame is not None]
        extent = tuple(np.mean([f.extent for f in frames], axis=0)) if frames else None
        crops = [remap_crops(p, run_classes) for p in used]
        positions = [remap_positions(p, run_classes) for p in used]
        anchors = [p.anchor for p in used if p.anchor is not None]
        if self.prior_alignment == "affine" and len(anchors) == len(used) > 1:
            # an ensemble's priors go onto its first reference's grid, where its queries will be registered
            positions = positions[:1] + [priors_onto(anchors[0], anchor, position)
                                         for anchor, position in zip(anchors[1:], positions[1:])]
        pools = [dataclasses.replace(TaskEmbedding.concatenate(
                     [self.encode_crops(c, run_classes, pos, fold=i) for c, pos in zip(crops, positions)]),
                     spacing=self.spacing, orientation=self.orientation, extent=extent)
                 for i in range(self.num_folds)]
        self.alignment_anchors = anchors
        self.registration_atlases = [p.atlas for p in used if p.atlas is not None]
        return EncodedReferences(pools, [p.case.name for p in used], crops,
                                 {p.case.label: p.lost for p in prepared if p.lost}, self.alignment_anchors,
                                 self.registration_atlases)

    def _prepare_reference(self, case: ReferenceCase, wanted: list[int] | None) -> tuple[tuple, PreparedReference]:
        """prepare_reference at the run's settings, reused from the previous encode_references call where the same
        files (path, size, modification time) were prepared at the same settings; and what made it."""
        paths = (*case.images, case.label)  # a missing one: prepare_reference names it, and nothing is kept
        files = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in paths if os.path.exists(f))
        key = (case.name, paths, files, tuple(wanted or ()), self.spacing, self.orientation, self.position_grid)
        prepared = self._prepared.get(key)
        if prepared is None or (self.registration_fusion and prepared.atlas is None):
            prepared = prepare_reference(case, self.preprocessing, self.reader_writer_class, self.patch_size, wanted,
                                         self.position_grid, self.orientation, self.registration_fusion)
        return key, prepared if self.registration_fusion else dataclasses.replace(prepared, atlas=None)

    def load_task(self, path: str, classes: Sequence[int] | None = None) -> TaskEmbedding:
        """A task file written by save_task / --save_task, checked to come from this model."""
        if self.num_folds > 1:
            raise IrisInputError(f"{path}: a task file holds one fold's embedding; a fold ensemble (-f "
                                 f"{' '.join(self.folds)}) encodes the references with each fold: give them with -r")
        if not os.path.isfile(path):
            raise IrisInputError(f"{path}: task file not found")
        self.alignment_anchors = []  # a task file holds no reference image: its priors are read through the frames
        self.registration_atlases = []
        try:
            task = TaskEmbedding.load(path, model=self.network)
        except TaskMismatchError as e:
            raise IrisInputError(f"{path}: task file from another model ({e}); encode it again with -r") from None
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is one line naming it
            raise IrisInputError(f"{path}: not a task file ({type(e).__name__}: {brief(e)})") from None
        if classes:
            missing = [int(c) for c in classes if int(c) not in task.classes]
            if missing:
                raise IrisInputError(f"--classes {' '.join(map(str, missing))}: absent from the task file {path}, "
                                     f"which holds {' '.join(map(str, task.classes))}")
            task = task.select(sorted(set(int(c) for c in classes)))
        return task

    def task_for_strategy(self, pool: Tasks, strategy: str, references: EncodedReferences | None = None,
                          tune_steps: int = DEFAULT_TUNE_STEPS, tune_lr: float = DEFAULT_TUNE_LR,
                          ) -> tuple[Tasks, list[float]]:
        """The task the queries start from (B = 1) and, for tune, the reference loss at each step (first: untuned;
        a fold ensemble: summed over the folds)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        pools = self.per_fold(pool)
        if strategy == "oneshot" and pools[0].batch_size != 1:
            raise IrisInputError(f"--strategy oneshot uses one reference, {pools[0].batch_size} given (use --strategy "
                                 f"ensemble to average them, or retrieval to pick per class)")
        if strategy != "tune":
            return self.for_folds(lambda i: pools[i].mean()), []
        if references is None:
            raise IrisInputError("--strategy tune optimises the task on the reference images: give them with -r "
                                 "(a task file holds no images)")
        losses: list[list[float]] = []

        def tuned(i: int) -> TaskEmbedding:
            task, fold_losses = self.tune(pools[i].mean(), references, tune_steps, tune_lr, fold=i)
            losses.append(fold_losses)
            return task
        return self.for_folds(tuned), [sum(step) for step in zip(*losses)]

    def tune(self, task: TaskEmbedding, references: EncodedReferences, steps: int = DEFAULT_TUNE_STEPS,
             lr: float = DEFAULT_TUNE_LR, fold: int = 0) -> tuple[TaskEmbedding, list[float]]:
        """In-context tuning of fold `fold`'s task on the reference crops (strategies.tune_task)."""
        return tune_task(self.fold_networks[fold], task, references.crops, references.pools[fold].present, steps, lr,
                         self.position_prior, self.device)

    # ------------------------------------------------------------------------------------ segmentation
    def segmenter(self) -> Segmenter:
        """The run's Segmenter: its fold networks, window, mirroring and position-prior choice."""
        return Segmenter(self.fold_networks, self.patch_size, self.tile_step_size,
                         tuple(self.allowed_mirroring_axes or ()) if self.use_mirroring else (), self.position_prior,
                         self.device, self.precision)

    def classes_in_one_pass(self, preprocessed_shape: Sequence[int]) -> int:
        if self.classes_per_pass:
            return self.classes_per_pass
        voxels = float(np.prod([max(s, p) for s, p in zip(preprocessed_shape, self.patch_size)]))
        per_voxel = 2 if self.num_folds == 1 else 10  # fp16 logits; an ensemble adds its fp32 sum and a sigmoid
        return max(1, int(self.map_memory_bytes // (per_voxel * voxels)))

    def fusion_weights(self, classes: Sequence[int]) -> np.ndarray:
        """Each class's registration weight (K,): 0 for a class the network segments alone, inf for one the
        registration segments alone; a fused class whose edge the references' images hide (hidden_edge_share at
        HIDDEN_EDGE_SHARE or more, averaged over the references that hold it) `hidden_edge_factor` times its own."""
        if self.class_registration_weights is None:
            weights = np.full(len(classes), self.registration_weight, np.float32)
        else:
            weights = np.array([self.class_registration_weights.get(int(c), 0.0) for c in classes], np.float32)
        hidden = self.hidden_edge_classes(classes)
        for k, c in enumerate(classes):
            if 0 < weights[k] < np.inf and int(c) in hidden:
                weights[k] *= self.hidden_edge_factor
        return weights

    def hidden_edge_classes(self, classes: Sequence[int]) -> list[int]:
        """The class values whose edge the references' images hide (registration.hidden_edge_share, averaged over the
        encoded references that hold the class, at HIDDEN_EDGE_SHARE or more); none where `hidden_edge_factor` is 1."""
        if self.hidden_edge_factor == 1:
            return []
        hidden = []
        for c in map(int, classes):
            shares = [a.hidden_edges[c] for a in self.registration_atlases if c in a.hidden_edges]
            if shares and np.mean(shares) >= HIDDEN_EDGE_SHARE:
                hidden.append(c)
        return hidden

    def segment_preprocessed(self, data: np.ndarray, properties: dict, task: Tasks, *, export: bool = True,
                             probabilities: bool = False, preprocessed_labels: bool = False,
                             frame: ScanFrame | None = None, scores: bool = False,
                             threshold: DecisionThreshold | None = None,
                             atlas: np.ndarray | None = None) -> QuerySegmentation:
        """Segment a preprocessed query (nnU-Net's sliding window, conditioned on `task`); `export` asks for labels in
        the original geometry, `probabilities` for per-class probabilities there, `preprocessed_labels` for labels in
        the model's space. Classes go in passes of `classes_in_one_pass`. `frame`: where the query's body lies (default:
        the one our preprocessing put in `properties`). `scores` asks for each voxel's winning logit in the original
        geometry; `threshold` replaces the predictor's decision_threshold; `atlas` (K, *cropped original shape), the
        references' labels registered onto the query (registered_label_maps), is averaged with the network's
        probabilities there (in the exported labels and probabilities, not the preprocessed ones)."""
        tasks = [t if t.batch_size == 1 else t.mean() for t in self.per_fold(task)]
        classes = tasks[0].classes
        if any(t.classes != classes for t in tasks[1:]):
            raise ValueError(f"the folds' tasks hold different classes: {[t.classes for t in tasks]}")
        k_total = len(classes)
        per_pass = self.classes_in_one_pass(data.shape[1:])
        cropped_shape = tuple(properties["shape_after_cropping_and_before_resampling"])
        per_export = max(1, int(self.map_memory_bytes // (8 * np.prod(data.shape[1:]) + 4 * np.prod(cropped_shape))))
        floors = threshold_logits(threshold or self.decision_threshold, classes)  # 0 for 0.5
        weights = self.fusion_weights(classes) if atlas is not None else None  # read only to fuse
        # a fused class is the network's logit moved by the registration's evidence: decided at the network's
        # threshold; a class by the registration alone is its registered label, decided at 0.5
        exported = floors if atlas is None else np.where(np.isinf(weights), 0, floors)  # Winner makes it float32
        original = Winner(cropped_shape, exported) if export or scores else None
        preprocessed = Winner(data.shape[1:], floors) if preprocessed_labels else None
        probs = np.zeros((k_total, *cropped_shape), dtype=np.float16) if probabilities else None
        image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        if frame is None and self.position_grid and self.position_prior:
            frame = scan_frame(properties)
        segmenter = self.segmenter()
        box = properties.get(BODY_BOX_KEY)  # a CT's body (RunPreprocessing): the windows run there alone
        # the registration alone (weight inf) needs no network output in the original geometry
        registration_only = atlas is not None and np.isinf(weights).all() and preprocessed is None
        for start in range(0, k_total, per_pass):
            stop = min(start + per_pass, k_total)
            logits = None if registration_only else segmenter.logits(image, tasks, frame, classes[start:stop], box)
            if preprocessed is not None:
                preprocessed.update(logits, start)
            if original is not None:
                for sub in range(0, stop - start, per_export):
                    if logits is None:
                        resampled = np.zeros((min(per_export, stop - start - sub), *cropped_shape), np.float32)
                    else:
                        resampled = resample_to_cropped_shape(logits[sub:sub + per_export], self.plans_manager,
                                                              self.configuration_manager, properties)
                    span = slice(start + sub, start + sub + resampled.shape[0])
                    if atlas is not None:
                        resampled = fuse_with_atlas(resampled, atlas[span], weights[span])
                    if probs is not None:
                        probs[span] = 1 / (1 + np.exp(-resampled))
                    original.update(resampled, start + sub)
                    del resampled
            del logits
        return QuerySegmentation(
            revert_crop_and_transpose(original.index, properties, self.plans_manager) if original else None,
            revert_crop_and_transpose(probs, properties, self.plans_manager) if probs is not None else None,
            preprocessed.index if preprocessed else None,
            revert_crop_and_transpose(original.logit, properties, self.plans_manager) if scores else None)

    # ------------------------------------------------------------------------------------ queries
    def retrieve(self, data: np.ndarray, properties: dict, task: Tasks, pool: Tasks,
                 top_k: int = 1, frame: ScanFrame | None = None) -> tuple[Tasks, dict[int, list[int]]]:
        """Segment with `task`, encode the query's predicted structures, pick per class the closest references
        (a fold ensemble: each fold picks with its own embeddings; the picks returned are any fold's). `frame`: as
        segment_preprocessed's."""
        labels = self.segment_preprocessed(data, properties, task, export=False, preprocessed_labels=True,
                                           frame=frame).preprocessed_labels
        present = [int(i) for i in np.unique(labels) if i != 0]
        if not present:
            return task, {}
        crops = structure_crops(data, labels.astype(np.int16), present, self.patch_size)  # tokens only: no frame
        tasks, pools = self.per_fold(task), self.per_fold(pool)
        picks: dict[int, set[int]] = {}

        def select(i: int) -> TaskEmbedding:
            query_task = self.encode_crops(crops, tasks[i].classes, mirrored=False, fold=i)  # compared by its tokens
            chosen, fold_picks = select_references(pools[i], query_task, top_k)
            for value, references in fold_picks.items():
                picks.setdefault(value, set()).update(references)
            return chosen
        return self.for_folds(select), {value: sorted(references) for value, references in picks.items()}

    def prepared_frame(self, data: np.ndarray, properties: dict) -> ScanFrame | None:
        """query_frame of a query our preprocessing made (its frame in `properties`); None without a position prior."""
        return self.query_frame(data, scan_frame(properties)) if self.position_grid and self.position_prior else None

    def query_frame(self, data: np.ndarray, frame: ScanFrame) -> ScanFrame:
        """The frame a preprocessed query (C, X, Y, Z) whose body frame is `frame` reads its task's position priors
        through: registered to the first reference (prior_alignment "affine", references encoded here), else its own."""
        if self.prior_alignment != "affine" or not self.alignment_anchors:
            return frame
        return aligned_frame(data, frame, self.alignment_anchors[0])

    @property
    def query_preparation(self) -> QueryPreparation:
        """Reads and preprocesses a query as this run does (picklable: worker processes run it)."""
        return QueryPreparation(self.preprocessing, self.reader_writer_class, self.modality, self.num_channels,
                                self.orientation, self.registration_fusion)

    def predict_case(self, images: Sequence[str], task: Tasks, pool: Tasks | None = None,
                     retrieval_top_k: int = 1, save_probabilities: bool = False) -> CaseResult:
        """Segment one query (channel files or a DICOM folder); with `pool`, by retrieval from it."""
        self.follow(task)
        return self.predict_prepared(self.query_preparation(images), task, pool, retrieval_top_k, save_probabilities)

    def predict_array(self, data: np.ndarray, properties: dict, task: Tasks, pool: Tasks | None = None,
                      retrieval_top_k: int = 1, save_probabilities: bool = False,
                      reader_writer: BaseReaderWriter | None = None) -> CaseResult:
        """Segment one query given as nnU-Net's readers return it: (C, Z, Y, X) and its properties (not modified)."""
        self.follow(task)
        prepared = self.query_preparation.array(data, properties, reader_writer or self.reader_writer_class())
        return self.predict_prepared(prepared, task, pool, retrieval_top_k, save_probabilities)

    def registered_atlas(self, query: PreparedQuery, classes: Sequence[int]) -> tuple[RegisteredLabels | None,
                                                                                       list[str]]:
        """The references' labels carried onto `query` (registered_label_maps) for registration fusion, and warnings:
        (None, [why]) where the registration fails, or looks less like the query than `registration_floor` asks."""
        if not self.registration_atlases or query.original is None:
            raise IrisInputError("registration fusion needs the reference images (-r), encoded with "
                                 "registration_fusion on: a task file holds no image")
        alone = "segmented by the network alone, without --registration_fusion"
        try:
            registered = registered_label_maps(*query.original, self.registration_atlases, classes,
                                               body=query.properties.get(ORIGINAL_BODY_BOX_KEY))
        except RuntimeError as error:  # SimpleITK: e.g. too little overlap to evaluate the metric
            return None, [f"its registration to the references failed ({brief(error)}): {alone}"]
        if self.registration_floor is not None and registered.similarity < self.registration_floor:
            return None, [f"its registration to the references looks doubtful (image correlation "
                          f"{registered.similarity:.2f}, below {self.registration_floor:.2f}): {alone}"]
        return registered, []

    def predict_prepared(self, query: PreparedQuery, task: Tasks, pool: Tasks | None = None,
                         retrieval_top_k: int = 1, save_probabilities: bool = False,
                         atlas: np.ndarray | None = None) -> CaseResult:
        """Segment a query preprocessed by QueryPreparation; with `pool`, by retrieval from it. `atlas`: the query's
        registered_atlas, where the caller made it already (registration fusion only)."""
        data, properties = query.data, query.properties
        frame = self.prepared_frame(data, properties)
        retrieved = None
        if pool is not None:
            task, retrieved = self.retrieve(data, properties, task, pool, retrieval_top_k, frame)
        classes = list(self.per_fold(task)[0].classes)
        fusion_warnings = []
        if not self.registration_fusion:
            atlas = None
        elif atlas is None:
            registered, fusion_warnings = self.registered_atlas(query, classes)
            atlas = None if registered is None else registered.maps
        result = self.segment_preprocessed(data, properties, task, probabilities=save_probabilities, frame=frame,
                                           atlas=atlas)
        warnings = query.warnings + fusion_warnings + field_of_view_warnings(self.per_fold(task)[0], properties)
        segmentation = indices_to_values(result.labels, classes)
        kept = classes if self.largest_component is True else \
            [c for c in classes if c in (self.largest_component or ())]
        if kept:  # the probabilities stay as the network gave them
            segmentation = keep_largest_components(segmentation, kept)
        # back to the query's own voxel order and header
        return CaseResult(to_storage(segmentation, properties), stored_properties(properties), query.reader_writer,
                          classes, to_storage(result.probabilities, properties), warnings, retrieved)

    # nnU-Net's entry points (nnUNetPredictor's names), each with the task as an argument
    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict, task: Tasks,
                                 save_or_return_probabilities: bool = False,
                                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(C, Z, Y, X) image and its properties (as SimpleITKIO().read_images gives them) -> label values (Z, Y, X)
        in the same geometry, and with `save_or_return_probabilities` the per-class probabilities (K, Z, Y, X)."""
        result = self.predict_array(input_image, image_properties, task, save_probabilities=save_or_return_probabilities)
        return (result.segmentation, result.probabilities) if save_or_return_probabilities else result.segmentation

    def predict_from_list_of_npy_arrays(self, image_or_list_of_images: np.ndarray | list[np.ndarray],
                                        properties_or_list_of_properties: dict | list[dict], task: Tasks,
                                        save_probabilities: bool = False) -> list:
        """predict_single_npy_array for each image (one process: the task is shared, nothing to fork for)."""
        images = image_or_list_of_images if isinstance(image_or_list_of_images, list) else [image_or_list_of_images]
        properties = properties_or_list_of_properties if isinstance(properties_or_list_of_properties, list) \
            else [properties_or_list_of_properties]
        if len(images) != len(properties):
            raise ValueError(f"{len(images)} images but {len(properties)} properties")
        return [self.predict_single_npy_array(i, p, task, save_probabilities) for i, p in zip(images, properties)]

    def predict_from_files(self, list_of_lists_or_source_folder: str | list[list[str]], output_folder: str,
                           task: Tasks, save_probabilities: bool = False) -> list[str]:
        """Segment a folder (or lists of channel files, one list per query) into output_folder, as iris_predict;
        returns one line per query that failed."""
        if isinstance(list_of_lists_or_source_folder, str):
            queries, problems = find_queries(list_of_lists_or_source_folder, self.num_channels)
        else:
            queries = [Query(strip_ending(os.path.basename(files[0])).removesuffix("_0000"), list(files))
                       for files in list_of_lists_or_source_folder]
            problems = []
        return problems + self.predict_queries(queries, output_folder, task, save_probabilities=save_probabilities,
                                               progress=self.allow_tqdm)

    def predict_sitk(self, image: sitk.Image | Sequence[sitk.Image], task: Tasks) -> sitk.Image:
        """A SimpleITK image (or one per channel) -> its label image, same geometry."""
        data, properties = sitk_to_array([image] if isinstance(image, sitk.Image) else list(image))
        return label_to_sitk(self.predict_single_npy_array(data, properties, task), properties)

    def predict_queries(self, queries: Sequence[Query], output_folder: str, task: Tasks,
                        pool: Tasks | None = None, retrieval_top_k: int = 1,
                        save_probabilities: bool = False, progress: bool = True,
                        report: Callable[[str], None] = print, reference_names: Sequence[str] | None = None,
                        preprocessing_workers: int = 0, export_workers: int = 0) -> list[str]:
        """Segment every query into output_folder/{case}{ending}; returns one line per query that failed
        (runner.run_queries: a failing query does not stop the others; nothing of it is written)."""
        return run_queries(self, queries, output_folder, task, pool, retrieval_top_k, save_probabilities, progress,
                           report, reference_names, preprocessing_workers, export_workers)

    @staticmethod
    def write_result(result: CaseResult, target: str, ending: str, save_probabilities: bool) -> None:
        """target{ending}, with `save_probabilities` also target.npz and .pkl (runner.write_result)."""
        write_result(result, target, ending, save_probabilities)
