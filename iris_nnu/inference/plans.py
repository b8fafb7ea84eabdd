"""The model's joint plan specialised for one inference run, and preprocessing with it.

Query and references of one run are normalised alike (`--modality`): `other` clips each image to its own
2nd/98th percentiles and z-scores it (as training did for MR/PET members); `CT` uses nnU-Net's CTNormalization
with the intensity statistics of the first CT member of the model's collection, or, without one, the paper's
fixed [-990, 500] HU window.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from acvl_utils.morphology.morphology_helper import generic_filter_components
from nnunetv2.utilities.plans_handling.plans_handler import (
    ConfigurationManager,
    PlansManager,
)

from iris_nnu.preprocessing.frames import SCAN_FRAME_KEY, body_frame
from iris_nnu.preprocessing.planner import CONFIGURATION
from iris_nnu.preprocessing.preprocessor import IrisPreprocessor

MODALITIES = ("CT", "other")
AUTO_MODALITY = "auto"  # iris_predict's default: CT where the images hold air in Hounsfield units (modality_of)
# CT images hold air at about -1000 HU (outside the body, airways, lungs, bowel gas); MR and PET hardly go below 0
CT_AIR_HU = -500.0
AIR_PERCENTILE = 0.5
CT_SCHEME = "CTNormalization"
OTHER_SCHEME = "PercentileZScoreNormalization"
FIXED_CT_WINDOW = (-990.0, 500.0)
# A query whose voxel size differs from the plan's spacing by more than this factor (any axis) gets a warning.
SPACING_WARNING_FACTOR = 3.0
# CT queries: warn when the 1st-99th percentile range of the query's voxels above CT_AIR_HU covers under this fraction
# of the model's window (its part above CT_AIR_HU).
CT_RANGE_OVERLAP_WARNING = 0.25
# nnU-Net's rule for normalising within the non-zero mask (a dataset's median crop keeps under 3/4 of the image),
# applied to each image at inference, where the image's own member is unknown
NONZERO_MASK_FRACTION = 0.75
# CT queries and references: the windows and the registration run over the body's box (BODY_BOX_KEY in the
# properties), not over the air around it, which filled 65-89% of a head-and-neck CT's windows. The body is every
# connected region above CT_AIR_HU that holds at least BODY_PART_SHARE of the largest one's voxels (an arm held apart
# from the trunk stays in; specks, a strip of the couch and the air do not), found on every BODY_STRIDE-th voxel;
# BODY_MARGIN_VOXELS more on each side (on each grid) keeps the skin inside.
BODY_PART_SHARE = 0.05
BODY_BOX_KEY = "iris_body_box"
ORIGINAL_BODY_BOX_KEY = "iris_body_box_original"  # the same on the cropped original grid (registration fusion)
BODY_STRIDE = 2
BODY_MARGIN_VOXELS = 2
# Label map handed to nnU-Net's preprocessor: it only needs a valid background entry (class_locations are skipped).
PREPROCESSOR_DATASET_JSON = {"labels": {"background": 0}}


def _fixed_ct_properties() -> dict:
    # Mapping the window linearly onto [-1, 1] keeps HU meaning the same in every scan (a per-scan z-score would not)
    lo, hi = FIXED_CT_WINDOW
    return {"mean": (lo + hi) / 2, "std": (hi - lo) / 2, "percentile_00_5": lo, "percentile_99_5": hi}


def inference_plans(joint_plans: dict, modality: str, num_channels: int, spacing: float | None = None) -> dict:
    """The joint plan with one normalisation for every image of the run (see the module docstring) and, when given,
    the run's isotropic spacing (planner.run_spacing) instead of the plan's finest."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    members = joint_plans.get("iris", {}).get("members", {})
    ct = [m for m in members.values() if m["normalization_schemes"] and set(m["normalization_schemes"]) == {CT_SCHEME}]
    other = [m for m in members.values() if CT_SCHEME not in m["normalization_schemes"]]
    plans = copy.deepcopy(joint_plans)
    configuration = plans["configurations"][CONFIGURATION]
    if modality == "CT":
        configuration["normalization_schemes"] = [CT_SCHEME] * num_channels
        configuration["use_mask_for_norm"] = list(ct[0]["use_mask_for_norm"]) if ct else [False] * num_channels
        plans["foreground_intensity_properties_per_channel"] = (
            copy.deepcopy(ct[0]["foreground_intensity_properties_per_channel"]) if ct
            else {str(c): _fixed_ct_properties() for c in range(num_channels)})
    else:
        configuration["normalization_schemes"] = [OTHER_SCHEME] * num_channels
        configuration["use_mask_for_norm"] = list(other[0]["use_mask_for_norm"]) if other else [False] * num_channels
        plans.setdefault("foreground_intensity_properties_per_channel",
                         {str(c): {} for c in range(num_channels)})
    if spacing is not None:
        configuration["spacing"] = [float(spacing)] * 3
    plans["configurations"] = {CONFIGURATION: configuration}
    return plans


def air_level(image: np.ndarray) -> float:
    """The image's 0.5th percentile: about -1000 in a CT (air in Hounsfield units), 0 or above in MR and PET."""
    values = np.asarray(image).ravel()
    return float(np.percentile(values, AIR_PERCENTILE)) if values.size else 0.0


def modality_of(image: np.ndarray, level: float | None = None) -> str:
    """"CT" when at least 0.5% of the image's voxels lie below -500 (air in Hounsfield units), else "other";
    `level`: its air_level, where the caller has it already."""
    return "CT" if (air_level(image) if level is None else level) < CT_AIR_HU else "other"


def trained_on_ct_only(joint_plans: dict) -> bool:
    members = joint_plans.get("iris", {}).get("members", {})
    return bool(members) and all(set(m["normalization_schemes"]) == {CT_SCHEME} for m in members.values())


def ct_body_box(image: np.ndarray) -> list[list[int]] | None:
    """[lo, hi) per axis of a CT image's (Z, Y, X) body: its connected regions above CT_AIR_HU of at least
    BODY_PART_SHARE of the largest one's size; None when nothing lies above it."""
    strided = np.asarray(image)[::BODY_STRIDE, ::BODY_STRIDE, ::BODY_STRIDE] > CT_AIR_HU
    if not strided.any():
        return None
    body = generic_filter_components(strided, lambda ids, sizes: [
        i for i, n in zip(ids, sizes) if n >= BODY_PART_SHARE * max(sizes)])
    return [[lo * BODY_STRIDE, min(n, hi * BODY_STRIDE)] for (lo, hi), n in zip(get_bbox_from_mask(body), image.shape)]


def box_on_cropped_grid(box: Sequence[Sequence[int]], properties: dict, transpose: Sequence[int],
                        margin: int = BODY_MARGIN_VOXELS) -> list[list[int]]:
    """A box of the image as read ([lo, hi) per axis) on its cropped original grid (transposed and cropped as nnU-Net's
    preprocessing did: its `properties`; RunPreprocessing.cropped_original), widened by `margin` voxels."""
    crop = properties["bbox_used_for_cropping"]
    shape = properties["shape_after_cropping_and_before_resampling"]
    return [[max(0, box[transpose[axis]][0] - crop[axis][0] - margin),
             min(n, box[transpose[axis]][1] - crop[axis][0] + margin)] for axis, n in enumerate(shape)]


def box_after_resampling(box: Sequence[Sequence[int]], properties: dict, shape: Sequence[int],
                         margin: int = BODY_MARGIN_VOXELS) -> list[list[int]]:
    """A box of the cropped original grid in the preprocessed grid of `shape` (resampled from it), widened by
    `margin` voxels."""
    cropped = properties["shape_after_cropping_and_before_resampling"]
    return [[max(0, int(np.floor(lo * n / c)) - margin), min(n, int(np.ceil(hi * n / c)) + margin)]
            for (lo, hi), n, c in zip(box, shape, cropped)]


class InferencePreprocessor(IrisPreprocessor):
    """Iris's preprocessor without the foreground sampling (a training-only cost: 10k locations per class)."""

    @staticmethod
    def _sample_foreground_locations(seg, classes_or_regions, seed=1234, verbose=False, min_num_samples=10000,
                                     min_percent_coverage=0.01):
        return {}


class RunPreprocessing:
    """Preprocess images (and labels) of one run with its specialised plan: transpose, crop, normalise, resample."""

    def __init__(self, plans: dict):
        self.plans_manager = PlansManager(plans)
        self.configuration_manager: ConfigurationManager = self.plans_manager.get_configuration(CONFIGURATION)
        masked = copy.deepcopy(plans)
        configuration = masked["configurations"][CONFIGURATION]
        configuration["use_mask_for_norm"] = [True] * len(configuration["normalization_schemes"])
        self._masked_configuration = PlansManager(masked).get_configuration(CONFIGURATION)
        self._preprocessor = InferencePreprocessor(verbose=False)
        self.is_ct = CT_SCHEME in self.configuration_manager.normalization_schemes

    def configuration_for(self, data: np.ndarray) -> ConfigurationManager:
        """The run's configuration, normalising within the non-zero mask where the image is mostly zero around it
        (a skull-stripped brain), as training did for that image's dataset: the joint plan holds one
        use_mask_for_norm (its first member's), which gave a brain the hippocampus's whole-image statistics
        (inside the brain mean 1.17, std 0.57 instead of 0, 1; OASIS one-shot Dice 0.26 instead of 0.51)."""
        if self.configuration_manager.normalization_schemes != [OTHER_SCHEME] * len(data):
            return self.configuration_manager
        # the box of nnU-Net's non-zero mask (create_nonzero_mask) without its hole filling, which cannot widen a box
        # and took 0.4 s of a brain query (the crop computes the mask again)
        box = get_bbox_from_mask(np.any(data != 0, axis=0))
        kept = float(np.prod([hi - lo for lo, hi in box])) / float(np.prod(data.shape[1:]))
        return self._masked_configuration if kept < NONZERO_MASK_FRACTION else self.configuration_manager

    def __call__(self, data: np.ndarray, seg: np.ndarray | None, properties: dict,
                 ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(C,Z,Y,X) image [+ (1,Z,Y,X) label] -> preprocessed image, label with -1 (outside the crop) mapped to 0;
        properties also get SCAN_FRAME_KEY: where the scan's body lies in it (the position prior's frame), and for a
        CT BODY_BOX_KEY: the body's box in it, where the windows run (and ORIGINAL_BODY_BOX_KEY: on the cropped
        original grid, where the registration runs)."""
        body = ct_body_box(data[0]) if self.is_ct else None
        out, out_seg, properties = self._preprocessor.run_case_npy(
            data, seg, properties, self.plans_manager, self.configuration_for(data), PREPROCESSOR_DATASET_JSON)
        properties[SCAN_FRAME_KEY] = body_frame(out_seg).to_dict()
        if body is not None:
            cropped = box_on_cropped_grid(body, properties, self.plans_manager.transpose_forward)
            properties[ORIGINAL_BODY_BOX_KEY] = cropped
            properties[BODY_BOX_KEY] = box_after_resampling(cropped, properties, out.shape[1:])
        if seg is None:
            return out, None, properties
        out_seg = out_seg[0]
        out_seg[out_seg < 0] = 0
        return out, out_seg, properties

    def cropped_original(self, volume: np.ndarray, properties: dict) -> tuple[np.ndarray, tuple[float, ...]]:
        """A (Z, Y, X) volume of a case this preprocessing ran on (`properties` as it returned them), transposed and
        cropped as it was but not resampled, and that grid's spacing: where the predictor exports its class maps."""
        transpose = self.plans_manager.transpose_forward
        box = properties["bbox_used_for_cropping"]
        cropped = np.transpose(volume, transpose)[tuple(slice(lo, hi) for lo, hi in box)]
        return cropped, tuple(float(properties["spacing"][i]) for i in transpose)

    def input_warnings(self, data: np.ndarray, properties: dict, modality: str) -> list[str]:
        """Spacing or intensity range far from what the model was planned for (empty when fine)."""
        warnings = []
        target = np.array(self.configuration_manager.spacing, dtype=float)
        spacing = np.array([properties["spacing"][i] for i in self.plans_manager.transpose_forward], dtype=float)
        ratio = spacing / target
        if np.any(ratio > SPACING_WARNING_FACTOR) or np.any(ratio < 1 / SPACING_WARNING_FACTOR):
            warnings.append(f"voxel size {tuple(round(float(s), 3) for s in spacing)} mm is far from the model's "
                            f"{tuple(round(float(s), 3) for s in target)} mm; it is resampled, so small structures "
                            f"may be lost or the result coarse")
        sample = data[:, ::2, ::2, ::2]
        if modality == "CT":
            for c in range(data.shape[0]):
                props = self.plans_manager.foreground_intensity_properties_per_channel[str(c)]
                lo, hi = float(props["percentile_00_5"]), float(props["percentile_99_5"])
                # the body against the window above air: air fills most of a head-and-neck CT and pulled its range
                # below the window (56 of the 60 development CTs were warned)
                body = sample[c][sample[c] > CT_AIR_HU]
                q_lo, q_hi = np.percentile(body if body.size else sample[c], [1, 99])
                lo = max(lo, CT_AIR_HU)
                covered = max(0.0, min(hi, q_hi) - max(lo, q_lo)) / max(hi - lo, 1e-6)
                if covered < CT_RANGE_OVERLAP_WARNING:
                    warnings.append(f"channel {c}: intensities {q_lo:.0f}..{q_hi:.0f} (1st-99th percentile above "
                                    f"air) are mostly outside the model's CT window {lo:.0f}..{hi:.0f}; is this a CT "
                                    f"in HU?")
        for c in range(data.shape[0]):
            if float(sample[c].max()) == float(sample[c].min()):
                warnings.append(f"channel {c}: constant intensity {float(sample[c].min()):g}; nothing to segment")
        return warnings
