"""From per-class logits in preprocessed space to a label map in the query's original geometry.

Iris outputs K independent sigmoid maps, not a softmax: a voxel gets the class with the highest probability
where it is above its decision threshold (0.5, or as calibrated for the run, one per class), else background.
Classes arrive in chunks and a running winner (best logit, class index) is kept, so memory does not grow with K x volume. Sigmoid is monotone, so comparing logits compares
probabilities and `logit > 0` is `p > 0.5`.

Resampling (nnU-Net's function, or the equal and faster trilinear interpolation where that is what it computes),
crop reversal and transpose are adapted from nnunetv2
(nnunetv2/inference/export_prediction.py, convert_predicted_logits_to_segmentation_with_correct_shape),
Copyright German Cancer Research Center (DKFZ), Apache-2.0.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.postprocessing.remove_connected_components import (
    remove_all_but_largest_component_from_segmentation,
)
from nnunetv2.preprocessing.resampling.default_resampling import (
    determine_do_sep_z_and_axis,
)
from nnunetv2.utilities.plans_handling.plans_handler import (
    ConfigurationManager,
    PlansManager,
)
from scipy.ndimage import find_objects


# the decision threshold of a run: one probability for every class, or one per class value
# (strategies.calibrated_threshold calibrates one per class on the references)
DecisionThreshold = Union[float, Mapping[int, float]]


def threshold_logit(threshold: float) -> float:
    """A probability as the logit a class's must exceed (0 for 0.5)."""
    return float(np.log(threshold / (1 - threshold)))


def threshold_logits(threshold: DecisionThreshold, classes: Sequence[int]) -> np.ndarray:
    """Each class's threshold as a logit (K,)."""
    values = [threshold[int(c)] if isinstance(threshold, Mapping) else threshold for c in classes]
    return np.array([threshold_logit(t) for t in values], dtype=np.float32)


def describe_threshold(threshold: DecisionThreshold) -> str:
    """"0.15", or for one per class "per class 0.01-0.5 (median 0.15)"."""
    if not isinstance(threshold, Mapping):
        return f"{threshold:g}"
    values = sorted(threshold.values())
    if values[0] == values[-1]:
        return f"{values[0]:g}"
    return f"per class {values[0]:g}-{values[-1]:g} (median {float(np.median(values)):g})"


class Winner:
    """Running per-voxel decision over class chunks: `index` (1-based) of the class with the highest logit where that
    logit exceeds its class's `floors` (one for all, or one per class), else 0; `logit` ends as the highest logit
    (the least floor where none exceeded it)."""

    def __init__(self, shape: tuple[int, ...], floors: float | np.ndarray = 0.0):
        # floor 0 = probability 0.5: a class must beat it to win
        self.floors = np.asarray(floors, dtype=np.float32)
        self.logit = np.full(shape, self.floors.min(), dtype=np.float32)
        self._index = np.zeros(shape, dtype=np.uint16)

    def update(self, logits: np.ndarray | torch.Tensor, first_index: int) -> None:
        """logits (k, *shape) of classes first_index+1 .. first_index+k, in any memory layout."""
        # the chunk's best class first (the first of equals, as a class-by-class loop with `>` keeps): one pass over a
        # chunk laid out class-last (resample_to_cropped_shape's) instead of k strided ones
        best, which = torch.max(torch.as_tensor(logits), 0)
        best, which = best.float().numpy(), which.numpy()
        better = best > self.logit
        self._index[better] = which[better] + (first_index + 1)
        np.maximum(self.logit, best, out=self.logit)

    @property
    def index(self) -> np.ndarray:
        if self.floors.ndim == 0 or np.all(self.floors == self.floors.min()):
            return self._index
        # per class: the most probable class, kept where it passes its own threshold (separable per class, so the
        # references calibrate each class's threshold on its own: strategies.calibrated_threshold)
        floor = np.concatenate([[np.inf], self.floors]).astype(np.float32)[self._index]
        return np.where(self.logit > floor, self._index, 0).astype(np.uint16)


def _is_plain_trilinear(configuration_manager: ConfigurationManager, current_spacing, new_spacing) -> bool:
    """Whether the configuration's probability resampling is nnU-Net's order-1 resize without the separate-z path."""
    configuration = configuration_manager.configuration
    kwargs = configuration.get("resampling_fn_probabilities_kwargs", {})
    if configuration.get("resampling_fn_probabilities") != "resample_data_or_seg_to_shape" \
            or kwargs.get("order") != 1 or kwargs.get("is_seg", False):
        return False
    separate_z, _ = determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), current_spacing, new_spacing)
    return not separate_z


def resample_to_cropped_shape(logits: torch.Tensor | np.ndarray, plans_manager: PlansManager,
                              configuration_manager: ConfigurationManager, properties: dict) -> np.ndarray:
    """(k, *preprocessed) logits -> (k, *shape after cropping, before resampling) float32, nnU-Net's resampling."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target_shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    if tuple(logits.shape[1:]) == tuple(target_shape):
        return np.asarray(logits.float().cpu() if isinstance(logits, torch.Tensor) else logits, dtype=np.float32)
    if _is_plain_trilinear(configuration_manager, configuration_manager.spacing, spacing_transposed):
        # nnU-Net's order-1 skimage resize (float64, channel by channel) equals trilinear interpolation with
        # align_corners=False to ~1e-5; torch's is ~10x faster, which matters with many classes on large volumes, and
        # 3x faster again with the classes as the innermost axis (vectorised across them): the result keeps that
        # layout, a (k, *shape) array whose class axis has stride 1
        tensor = torch.as_tensor(logits)[None].to(torch.float32, memory_format=torch.channels_last_3d)
        return F.interpolate(tensor, size=target_shape, mode="trilinear", align_corners=False)[0].numpy()
    if isinstance(logits, torch.Tensor):
        logits = logits.float().cpu().numpy()
    return configuration_manager.resampling_fn_probabilities(
        logits.astype(np.float32, copy=False), target_shape, configuration_manager.spacing, spacing_transposed)


def revert_crop_and_transpose(array: np.ndarray, properties: dict, plans_manager: PlansManager) -> np.ndarray:
    """Put an (..., *cropped) array back into the full image (zeros outside the crop) and undo the transpose."""
    lead = array.shape[:-3]
    full = np.zeros((*lead, *properties["shape_before_cropping"]), dtype=array.dtype)
    insert_crop_into_image(full, array, properties["bbox_used_for_cropping"])
    return full.transpose([*range(len(lead)), *(len(lead) + i for i in plans_manager.transpose_backward)])


def label_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint8 if max_value < 256 else np.uint16 if max_value < 65536 else np.uint32)


def indices_to_values(indices: np.ndarray, classes: list[int]) -> np.ndarray:
    """Class indices (0 = background, i = classes[i - 1]) -> the references' label values."""
    values = np.array([0, *classes], dtype=label_dtype(max(classes, default=0)))
    return values[indices]


def keep_largest_components(segmentation: np.ndarray, values: list[int]) -> np.ndarray:
    """Each class's largest connected component only (nnU-Net's function, run inside each class's bounding box)."""
    out = segmentation.copy()
    boxes = find_objects(out.astype(np.int64, copy=False), max_label=max(values, default=0))
    for value in values:
        box = boxes[value - 1] if value > 0 else None
        if box is not None:
            out[box] = remove_all_but_largest_component_from_segmentation(out[box], int(value))
    return out
