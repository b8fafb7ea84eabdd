"""The position prior carried from a reference to a query by an affine registration of the two scans.

A task's priors lie on a grid over its reference's body frame (model/position.py). Without the reference image a
query can only be matched to it frame to frame: both bodies' centres, principal axes and spreads put onto each other.
Where the reference image is at hand (`iris_predict -r`, not a task file: a task holds no patient image), the query
is registered to it instead, and the prior is read through that transform: the query gets the frame that puts each of
its voxels where the registration maps it in the reference's frame. The registration starts from the frames' match,
so it can only refine it; a result that fits the images worse than its start is dropped (the frames are kept).

Registration: SimpleITK, affine, Mattes mutual information (so CT and MR, and either normalisation, work), on both
preprocessed scans smoothed and resampled to a coarse grid (at most MAX_ALIGNMENT_VOXELS); 0.3-2 s per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from iris_nnu.model.position import POSITION_EXTENT, ScanFrame, sample_prior

PRIOR_ALIGNMENTS = ("affine", "frames")
# Registration grid: coarse on purpose (an affine transform has 12 parameters; a cell of the prior's grid is 4-40 mm):
# at most MAX_ALIGNMENT_VOXELS, but never coarser than MIN_ALIGNMENT_VOXELS along the scan's shortest side, nor finer
# than the scan. A head-and-neck CT (606 x 322 x 606 mm): 4 mm grid 10.0 s, 8 mm 1.6 s, the frames found differing by
# a third of a prior cell at most.
MAX_ALIGNMENT_VOXELS = 150_000
MIN_ALIGNMENT_VOXELS = 24
ALIGNMENT_ITERATIONS = 100
ALIGNMENT_SAMPLES = 20_000  # Mattes MI samples per evaluation (random, seeded: the same query gives the same frame)
ALIGNMENT_SEED = 1234


@dataclass(frozen=True)
class AlignmentAnchor:
    """What a query needs of a reference to be registered to it: the reference's first channel on the registration
    grid, and its frame (preprocessed voxels). In memory only: never saved with a task."""

    image: sitk.Image
    frame: ScanFrame
    spacing: tuple[float, float, float]  # mm per preprocessed voxel


def registration_image(data: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """A preprocessed scan (C, X, Y, Z) -> its first channel smoothed onto the registration grid; physical point
    p = voxel * spacing (origin 0, axes as the voxels')."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data[0], dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = max(min(float(np.prod(extent) / MAX_ALIGNMENT_VOXELS) ** (1 / 3), min(extent) / MIN_ALIGNMENT_VOXELS),
               max(spacing))
    if grid <= max(spacing) * 1.01:
        return image
    size = [max(1, round(e / grid)) for e in extent]
    origin = [(grid - s) / 2 for s in spacing]  # the grid's first cell covers the scan's first voxels
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(image, grid / 2), size, sitk.Transform(), sitk.sitkLinear,
                         origin, [grid] * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)


def alignment_anchor(data: np.ndarray, frame: ScanFrame, spacing: Sequence[float]) -> AlignmentAnchor:
    """The anchor of a preprocessed reference (C, X, Y, Z) with its frame."""
    return AlignmentAnchor(registration_image(data, spacing), frame, tuple(float(s) for s in spacing))


def frames_transform(query: ScanFrame, reference: ScanFrame, spacing: Sequence[float]) -> sitk.AffineTransform:
    """The affine map of query points to reference points (mm) that puts the two frames onto each other."""
    s = np.diag(np.asarray(spacing, dtype=float))
    matrix = s @ np.linalg.inv(np.asarray(reference.axes)) @ np.asarray(query.axes) @ np.linalg.inv(s)
    transform = sitk.AffineTransform(3)
    transform.SetCenter((s @ np.asarray(query.centre)).tolist())
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation((s @ (np.asarray(reference.centre) - np.asarray(query.centre))).tolist())
    return transform


def transform_frame(transform: sitk.AffineTransform, reference: ScanFrame, spacing: Sequence[float]) -> ScanFrame:
    """The query's frame under which a query voxel has the reference-frame coordinates of the reference voxel that
    `transform` (query mm -> reference mm) maps it to."""
    s = np.asarray(spacing, dtype=float)
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    m = a * s[None, :] / s[:, None]  # voxels: x_ref = m @ x_query + b
    b = (t + c - a @ c) / s
    return ScanFrame.from_dict({"centre": np.linalg.solve(m, np.asarray(reference.centre) - b),
                                "axes": np.asarray(reference.axes) @ m})


def _method(fraction: float | None) -> sitk.ImageRegistrationMethod:
    """Mattes MI, linear interpolation; `fraction` of the fixed grid sampled at random (seeded), None: every voxel."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if fraction is None:
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(fraction, ALIGNMENT_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def aligned_frame(query_data: np.ndarray, query_frame: ScanFrame, anchor: AlignmentAnchor) -> ScanFrame:
    """The query's frame for the anchor's prior: its frames' match refined by an affine registration of the query
    (C, X, Y, Z, preprocessed at the anchor's spacing) to the reference; the frames' match where it fits better."""
    return registered_frame(registration_image(query_data, anchor.spacing), query_frame, anchor)


def registered_frame(fixed: sitk.Image, query_frame: ScanFrame, anchor: AlignmentAnchor) -> ScanFrame:
    """aligned_frame for a query already on its registration grid (registration_image)."""
    moving = anchor.image
    start = frames_transform(query_frame, anchor.frame, anchor.spacing)
    method = _method(min(1.0, ALIGNMENT_SAMPLES / float(np.prod(fixed.GetSize()))))
    shrinks = [f for f in (2, 1) if min(fixed.GetSize()) / f >= 12] or [1]
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([f - 1 for f in shrinks])
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                    numberOfIterations=ALIGNMENT_ITERATIONS,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    transform = sitk.AffineTransform(start)
    method.SetInitialTransform(transform, inPlace=True)
    try:
        method.Execute(fixed, moving)
    except RuntimeError:  # too little overlap to evaluate the metric: the frames are all we know
        return transform_frame(start, anchor.frame, anchor.spacing)
    return transform_frame(_better(fixed, moving, start, transform), anchor.frame, anchor.spacing)


def _better(fixed: sitk.Image, moving: sitk.Image, start: sitk.AffineTransform,
            result: sitk.AffineTransform) -> sitk.AffineTransform:
    """Of the frames' match and the registration's result, the one the metric (lower: better) prefers, evaluated
    on every voxel of the registration grid."""
    def value(transform: sitk.AffineTransform) -> float:
        method = _method(None)
        method.SetInitialTransform(transform)
        try:
            return float(method.MetricEvaluate(fixed, moving))
        except RuntimeError:
            return float("inf")
    return result if value(result) <= value(start) else start


def priors_onto(first: AlignmentAnchor, other: AlignmentAnchor, priors: torch.Tensor) -> torch.Tensor:
    """Another reference's priors (K, G, G, G) carried onto the first reference's grid through an affine registration
    of the first to the other, so that an ensemble averages them where the first reference's frame puts them and a
    query registered to the first reads them all (peaks kept at 1)."""
    frame = registered_frame(first.image, first.frame, other)
    g = priors.shape[-1]
    cells = (torch.arange(g, dtype=torch.float64) * 2 + 1) / g - 1  # cell centres' grid coordinates
    grid = torch.stack(torch.meshgrid(cells, cells, cells, indexing="ij"), -1).reshape(-1, 3) * POSITION_EXTENT
    axes, centre = (torch.tensor(v, dtype=torch.float64) for v in (first.frame.axes, first.frame.centre))
    voxels = grid @ torch.linalg.inv(axes).T + centre  # the first reference's voxels at its cells' centres
    coordinates = frame.grid_coordinates(voxels).T.reshape(1, 3, g, g, g)  # where they lie on the other's grid
    moved = sample_prior(priors[None].float(), coordinates)[0]
    return moved / moved.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
