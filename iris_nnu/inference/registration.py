"""A reference's label carried onto a query by a deformable registration (SimpleITK: affine from image moments, then
a coarse B-spline, both by Mattes mutual information, so CT and MR and any normalisation work; then demons on
histogram-matched intensities for the finer shape, on a 3 mm grid and then on a finer one where the scan has it).

Two users: benchmarks/accuracy.py's registration baseline, and `iris_predict --registration_fusion`, which adds the
references' labels registered onto the query (`registered_label_maps`, on the scans' own grids, before resampling: on
the preprocessed ones, where nnU-Net resamples a thick-slice axis by nearest neighbour, the abdomen scored 0.629
instead of 0.739) to each class's logit as evidence (inference/predictor.fuse_with_atlas). Iris alone knows what a
structure looks like; a registration where it lies in this anatomy (README, Results).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# ITK's v4 metrics fill a dense Jacobian per sample, so a B-spline step costs samples x parameters: the samples are
# capped (the fraction holds for small grids) and the mesh is coarse.
SAMPLING = 0.15  # fraction of the registration grid's voxels sampled by Mattes MI (random, seeded)
MAX_SAMPLES = {"affine": 100_000, "bspline": 20_000}
BSPLINE_MESH = 3  # intervals per axis: 6 control points per axis with cubic B-splines
# L-BFGS-B iterations per resolution level. 20 rather than 50: the labels land as well at 40-60% of the time (registration
# alone from one reference: hippocampus 0.659 against 0.654 over 10 queries, abdomen 0.789 against 0.794 and CT 0.330
# against 0.330 over 3; seconds 2.8 / 23 / 29 against 7.0 / 32 / 34; README, Results)
BSPLINE_ITERATIONS = 20
# a registration grid shorter than this along an axis gets no B-spline: on crops as small as the hippocampus's (32 x 44
# x 32 voxels) the affine and demons alone carry the labels as well (0.655 against 0.654) in a tenth of the time
MIN_BSPLINE_GRID_VOXELS = 64
MIN_GRID_VOXELS = 32  # the registration grid keeps at least this many voxels along the shortest axis
REGISTRATION_SPACING_MM = 2.0  # the grid the transforms are optimised on (labels are warped at full resolution)
# A coarse B-spline leaves organs' shapes; demons after it took the registration from 0.33 to 0.47 on head-and-neck
# CT (ANTs SyN 0.44): benchmarks/accuracy.py --methods registration --demons_iterations 0 / 50 (README, Results)
DEMONS_ITERATIONS = 50
DEMONS_SPACING_MM = 3.0  # the demons' grid: no finer than the registration grid
DEMONS_SMOOTHING = 1.5  # the displacement field's Gaussian sigma, in voxels of the demons' grid
# Then demons once more on each scan's finer grid (fine_demons_grid: spacing, iterations, sigma in its voxels), where
# that is finer than the first level's along every axis (brains, the abdomen; not head-and-neck CT or the hippocampus
# crops, whose first level runs on their own grid): 3 mm leaves a brain's deep structures coarse. Registration alone
# from oasis_007, 3 held-out brains: 85 structures 0.499 -> 0.587, the 12 subcortical 0.722 -> 0.758 (ANTs SyN 0.562 /
# 0.764), 22 -> 32 s; fused 0.587 -> 0.639 (README, Results). At most FINE_DEMONS_VOXELS: an abdomen's 320 mm field of
# view would be 8.6 M voxels at 1.5 mm
FINE_DEMONS = (1.5, 20, 1.0)  # spacing mm, iterations (0: none), sigma
FINE_DEMONS_VOXELS = 2_500_000
BODY_LEVEL = 0.02  # on a registration grid (intensities scaled to [0, 1]), what lies above is body, not air


def registration_grid(image: sitk.Image, spacing_mm: float = REGISTRATION_SPACING_MM) -> sitk.Image:
    """Float32, 0.5-99.5th percentiles scaled to [0, 1], smoothed and resampled to isotropic `spacing_mm` (no finer
    than the image, no coarser than MIN_GRID_VOXELS along its shortest extent)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    lo, hi = np.percentile(array, (0.5, 99.5))
    out = sitk.GetImageFromArray(np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))
    out.CopyInformation(image)
    grid_spacing = _grid_spacing(image, spacing_mm)
    if grid_spacing == tuple(image.GetSpacing()):
        return out
    spacing = grid_spacing[0]
    size = [max(1, round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(out, spacing / 2), size, sitk.Transform(), sitk.sitkLinear,
                         image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)


def _grid_spacing(image: sitk.Image, spacing_mm: float) -> tuple[float, ...]:
    """The spacing of registration_grid(image, spacing_mm), without making it."""
    spacing = min(spacing_mm, min(n * s for n, s in zip(image.GetSize(), image.GetSpacing())) / MIN_GRID_VOXELS)
    return tuple(image.GetSpacing()) if spacing <= min(image.GetSpacing()) * 1.01 else (spacing,) * 3


def _method(grid: sitk.Image, stage: str, shrinks: list[int], seed: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    fraction = min(SAMPLING, MAX_SAMPLES[stage] / np.prod(grid.GetSize()))
    method.SetMetricSamplingPercentage(fraction, seed + 1)  # SimpleITK reads seed 0 as "seed from the clock"
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([f // 2 for f in shrinks])  # voxels: 4 -> 2, 2 -> 1, 1 -> 0
    method.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    return method


def deformable_transform(fixed_image: sitk.Image, moving_image: sitk.Image,
                         spacing_mm: float = REGISTRATION_SPACING_MM, seed: int = 0,
                         demons_iterations: int | None = None) -> sitk.Transform:
    """Register moving to fixed (affine from image moments, then B-spline unless the grid is shorter than
    MIN_BSPLINE_GRID_VOXELS; Mattes MI, multi-resolution, seeded sampling; on a `spacing_mm` grid), then demons for
    what they leave (`demons_iterations` on DEMONS_SPACING_MM, None: DEMONS_ITERATIONS; 0: no demons; then FINE_DEMONS
    on the scans' fine_demons_grid): the transform of fixed points to moving points."""
    fixed = registration_grid(fixed_image, spacing_mm)
    fine = (fine_demons_grid(fixed_image), fine_demons_grid(moving_image)) if fine_demons_run(fixed, fixed_image) \
        else None
    return grid_transform(fixed, registration_grid(moving_image, spacing_mm), seed, demons_iterations, fine)


def grid_transform(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, demons_iterations: int | None = None,
                   fine: tuple[sitk.Image, sitk.Image] | None = None) -> sitk.Transform:
    """deformable_transform for two scans already on their registration grids (registration_grid), and on their
    fine_demons_grid (`fine`, fixed then moving; None: the demons' coarse level alone)."""
    shrinks = [f for f in (4, 2, 1) if min(fixed.GetSize()) / f >= 16] or [1]
    affine = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                               sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = _method(fixed, "affine", shrinks, seed)
    method.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6,
                                         convergenceWindowSize=10, estimateLearningRate=method.EachIteration)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, moving)
    if min(fixed.GetSize()) < MIN_BSPLINE_GRID_VOXELS:
        return _with_demons([affine], fixed, moving, demons_iterations, fine)
    bspline = sitk.BSplineTransformInitializer(fixed, [BSPLINE_MESH] * 3, 3)
    method = _method(fixed, "bspline", shrinks[-2:], seed)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * BSPLINE_ITERATIONS,
                                costFunctionConvergenceFactor=1e7)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    try:
        method.Execute(fixed, moving)
    except RuntimeError:  # L-BFGS-B stepped the B-spline off the moving scan (1 of 6 CT pairs): the affine stands
        return _with_demons([affine], fixed, moving, demons_iterations, fine)
    return _with_demons([affine, sampled_field(bspline, fixed)], fixed, moving, demons_iterations, fine)


def sampled_field(transform: sitk.Transform, grid: sitk.Image) -> sitk.DisplacementFieldTransform:
    """`transform` sampled at `grid`'s voxels, as a displacement field interpolated linearly between them (identity
    outside the grid, as a B-spline outside its mesh)."""
    # A cubic B-spline costs 64 control points per evaluated point: a brain's 1 mm grid took 6 of the 7 s of carrying
    # its labels through the whole transform. Its mesh spans the grid in 3 intervals, so linear interpolation between
    # the grid's voxels (2 mm) moves points by hundredths of a millimetre (test_alignment checks it)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(),
                                              grid.GetSpacing(), grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _with_demons(smooth_parts: list[sitk.Transform], fixed: sitk.Image, moving: sitk.Image,
                 demons_iterations: int | None,
                 fine: tuple[sitk.Image, sitk.Image] | None = None) -> sitk.Transform:
    """The smooth transforms (applied last-first: fixed -> B-spline -> affine -> moving), then demons for what they
    leave (`demons_iterations`, None: DEMONS_ITERATIONS; 0: none) on a DEMONS_SPACING_MM grid, then on the `fine`
    grids of the two scans (fine_demons_grid) where they are finer along every axis."""
    if demons_iterations is None:
        demons_iterations = DEMONS_ITERATIONS  # read at the call: benchmarks/accuracy.py --demons_iterations sets it
    parts = list(smooth_parts)
    if demons_iterations <= 0:
        return sitk.CompositeTransform(parts)
    coarse = fixed
    spacing = _coarse_demons_spacing(fixed)
    if spacing != tuple(fixed.GetSpacing()):
        size = [max(1, round(n * s / spacing[0])) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
        coarse = sitk.Resample(fixed, size, sitk.Transform(), sitk.sitkLinear, fixed.GetOrigin(), spacing,
                               fixed.GetDirection(), 0.0, sitk.sitkFloat32)
    parts.append(_demons_field(coarse, moving, sitk.CompositeTransform(parts), demons_iterations, DEMONS_SMOOTHING))
    _, iterations, smoothing = FINE_DEMONS
    if fine is not None and iterations > 0 and _finer(fine[0].GetSpacing(), coarse.GetSpacing()):
        parts.append(_demons_field(fine[0], fine[1], sitk.CompositeTransform(parts), iterations, smoothing))
    return sitk.CompositeTransform(parts)


def _coarse_demons_spacing(fixed: sitk.Image) -> tuple[float, ...]:
    """The spacing of the demons' first level on the `fixed` registration grid: DEMONS_SPACING_MM, or the grid's own
    where that is no coarser (at least MIN_GRID_VOXELS along the shortest extent)."""
    spacing = min(DEMONS_SPACING_MM, min(n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())) / MIN_GRID_VOXELS)
    return (spacing,) * 3 if spacing > max(fixed.GetSpacing()) * 1.01 else tuple(fixed.GetSpacing())


def _finer(fine: Sequence[float], coarse: Sequence[float]) -> bool:
    # finer along every axis: a head-and-neck CT's grid (3.9-5 mm in-plane, 2.5 mm slices) is the first level's,
    # and its fine grid, capped at FINE_DEMONS_VOXELS over the whole scan, would be coarser than its slices
    return max(fine) < 0.99 * min(coarse)


def fine_demons_run(fixed: sitk.Image, fixed_image: sitk.Image) -> bool:
    """Whether the demons' second level runs for a fixed scan (`fixed_image`, on its registration grid `fixed`): its
    fine_demons_grid finer along every axis than the first level's. Decided before making the fine grids, which a
    head-and-neck CT never uses (0.16 s a query)."""
    return FINE_DEMONS[1] > 0 and _finer(_fine_demons_spacing(fixed_image), _coarse_demons_spacing(fixed))


def _fine_demons_mm(image: sitk.Image) -> float:
    """FINE_DEMONS' spacing, coarser where that would exceed FINE_DEMONS_VOXELS over `image`."""
    extent = np.prod([n * s for n, s in zip(image.GetSize(), image.GetSpacing())])
    return max(FINE_DEMONS[0], float(extent / FINE_DEMONS_VOXELS) ** (1 / 3))


def _fine_demons_spacing(image: sitk.Image) -> tuple[float, ...]:
    return _grid_spacing(image, _fine_demons_mm(image))


def fine_demons_grid(image: sitk.Image) -> sitk.Image:
    """`image` as registration_grid makes it at FINE_DEMONS' spacing, coarser where that would exceed
    FINE_DEMONS_VOXELS: the grid of the demons' second, finer level."""
    return registration_grid(image, _fine_demons_mm(image))


def _demons_field(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, iterations: int,
                  smoothing: float) -> sitk.DisplacementFieldTransform:
    """What `before` leaves: symmetric-forces demons between the `fixed` grid and the moving scan carried onto it,
    its histogram matched to the fixed's (demons compares intensities; both scans of a run are one modality), the
    field smoothed by `smoothing` voxels: a displacement field applied before `before`."""
    carried = sitk.Resample(moving, fixed, before, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matched = sitk.HistogramMatching(carried, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7,
                                     thresholdAtMeanIntensity=True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing)
    return sitk.DisplacementFieldTransform(sitk.Cast(demons.Execute(fixed, matched), sitk.sitkVectorFloat64))


def register_label(fixed_image: sitk.Image, moving_image: sitk.Image, moving_label: sitk.Image,
                   spacing_mm: float = REGISTRATION_SPACING_MM, seed: int = 0,
                   demons_iterations: int | None = None) -> sitk.Image:
    """moving_label warped onto fixed_image's full grid (nearest neighbour) through deformable_transform."""
    transform = deformable_transform(fixed_image, moving_image, spacing_mm, seed, demons_iterations)
    return sitk.Resample(moving_label, fixed_image, transform, sitk.sitkNearestNeighbor, 0.0,
                         moving_label.GetPixelID())


@dataclass(frozen=True)
class RegistrationAtlas:
    """A reference as --registration_fusion registers it: its first channel and label (index i = values[i - 1]) on
    its cropped original grid (transposed and cropped as preprocessed, not resampled: RunPreprocessing.
    cropped_original), in the run's voxel order. In memory only: never saved with a task."""

    image: np.ndarray
    labels: np.ndarray
    values: tuple[int, ...]
    spacing: tuple[float, ...]

    @cached_property
    def grid(self) -> sitk.Image:
        """The image on its registration grid, made once per run (every query registers to it)."""
        return registration_grid(_voxel_image(self.image, self.spacing))

    @cached_property
    def fine_grid(self) -> sitk.Image:
        """The image on its fine_demons_grid, made once per run."""
        return fine_demons_grid(_voxel_image(self.image, self.spacing))

    @cached_property
    def hidden_edges(self) -> dict[int, float]:
        """hidden_edge_share of each class value the label holds."""
        boxes = ndimage.find_objects(self.labels.astype(np.int32, copy=False), max_label=len(self.values))
        return {value: hidden_edge_share(self.image, self.labels, index + 1, box)
                for index, (value, box) in enumerate(zip(self.values, boxes)) if box is not None}


HIDDEN_EDGE_DEPTH = 2  # voxels outside a structure that hidden_edge_share reads


def hidden_edge_share(image: np.ndarray, labels: np.ndarray, index: int,
                      box: tuple[slice, ...] | None = None) -> float:
    """How little of structure `index`'s edge `image` shows: the share of the voxels just outside it (HIDDEN_EDGE_DEPTH
    deep) whose intensity lies within the 10th-90th percentiles of its inner voxels (less its surface). A network
    reading the image cannot find such an edge; a registration carries it from the anatomy around (the thalamus and
    ventral DC on a T1 brain: 0.20-0.45; its cortical parcels and ventricles mostly under 0.2; the abdomen's liver
    and kidneys under 0.2 in four of six references, up to 0.39 in the others). `box`: the structure's bounding box
    in `labels` (scipy.ndimage.find_objects), None: found here."""
    if box is None:
        found = ndimage.find_objects((labels == index).astype(np.int8))
        if not found:
            raise ValueError(f"the labels hold no voxel of index {index}")
        box = found[0]
    pad = HIDDEN_EDGE_DEPTH + 1
    region = tuple(slice(max(0, b.start - pad), b.stop + pad) for b in box)
    mask = labels[region] == index
    values = image[region]
    outside = ndimage.binary_dilation(mask, iterations=HIDDEN_EDGE_DEPTH) & ~mask
    inner = ndimage.binary_erosion(mask)
    inner = inner if inner.sum() >= 10 else mask
    if not outside.any():
        return 0.0
    lo, hi = np.percentile(values[inner], (10, 90))
    return float(np.mean((values[outside] >= lo) & (values[outside] <= hi)))


def _voxel_image(array: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """A (Z, Y, X) volume as an image of that spacing (origin 0, axes as the voxels': all scans of a run are in its
    voxel order)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    return image


def registration_similarity(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """How alike two registration grids (registration_grid) look once `transform` carries the moving onto the fixed:
    the correlation of their intensities over the fixed's body (above BODY_LEVEL) where the moving scan lands. A
    registration that failed shows it (head-and-neck CT onto one reference: 0.25-0.62 where the labels missed, 0.67-0.80
    where they landed)."""
    carried = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1.0, sitk.sitkFloat32))
    values = sitk.GetArrayFromImage(fixed)
    body = (carried >= 0) & (values > BODY_LEVEL)
    a, b = values[body], carried[body]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


@dataclass(frozen=True)
class RegisteredLabels:
    """The references' labels carried onto a query (registered_label_maps): per class (K, Z, Y, X) float32 in [0, 1]
    (class_last_zeros' layout), and the registrations' mean registration_similarity."""

    maps: np.ndarray
    similarity: float


def registered_label_maps(query: np.ndarray, spacing: Sequence[float], atlases: Sequence[RegistrationAtlas],
                          classes: Sequence[int], seed: int = 0,
                          body: Sequence[Sequence[int]] | None = None) -> RegisteredLabels:
    """Per class of `classes` (label values), the atlases' labels carried onto the query's cropped original grid
    (`query` (Z, Y, X), its `spacing`) by deformable_transform, each class's mask warped with linear interpolation,
    per class the mean over the atlases that hold it (0 where none does); and how alike the query and the atlases
    look after it. `body`: [lo, hi) per axis of the query where the registration runs (a CT's body box:
    plans.ORIGINAL_BODY_BOX_KEY); 0 outside it."""
    maps = class_last_zeros(len(classes), query.shape)
    region = (slice(None),) * 3 if body is None else tuple(slice(lo, hi) for lo, hi in body)
    holders = np.zeros(len(classes), dtype=np.float32)
    similarities = []
    fixed = _voxel_image(query[region], spacing)
    fixed_grid = registration_grid(fixed)
    fixed_fine = fine_demons_grid(fixed) if fine_demons_run(fixed_grid, fixed) else None
    for atlas in atlases:
        transform = grid_transform(fixed_grid, atlas.grid, seed,
                                   fine=None if fixed_fine is None else (fixed_fine, atlas.fine_grid))
        similarities.append(registration_similarity(fixed_grid, atlas.grid, transform))
        rows = [atlas.values.index(value) + 1 if value in atlas.values else 0 for value in classes]
        warp_masks(transform, fixed, atlas.labels, rows, atlas.spacing[::-1], out=maps[(slice(None), *region)])
        holders += np.asarray(rows) > 0
    if holders.max(initial=0) > 1:
        maps /= np.maximum(holders, 1)[:, None, None, None]
    at_most_one(maps)
    return RegisteredLabels(maps, float(np.mean(similarities)))


WARP_BLOCK_VOXELS = 1_000_000  # fixed voxels per block of warp_masks: bounds its temporaries (about 0.2 GB)


def warp_masks(transform: sitk.Transform, fixed: sitk.Image, labels: np.ndarray, indices: Sequence[int],
               spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0),
               direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
               out: np.ndarray | None = None) -> np.ndarray:
    """Each mask labels == i (i in `indices`; `labels` (Z, Y, X) on the grid of `spacing`, `origin`, `direction`,
    SimpleITK's x, y, z order) carried onto `fixed`'s grid through `transform` (fixed points -> label points) with
    linear interpolation, as sitk.Resample would: (len(indices), Z, Y, X) float32 in [0, 1] (class_last_zeros'
    layout), or added into `out` where given (a running sum of any layout, a view too; each mask adds at most 1 + an
    ulp). An index of 0 or one the labels lack gives zeros. The transform is evaluated once per fixed voxel, and each
    fixed voxel adds its 8 label neighbours' interpolation weights to the masks their labels name: every mask in one
    pass, whatever their number (benchmarks/warp_speed.py)."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    shift = sitk.GetArrayViewFromImage(field)  # (Z, Y, X, 3), components x, y, z (mm)
    # label index (x, y, z) of fixed index i: to_label @ (i * fixed spacing) + offset + to_label @ shift
    to_label = np.diag(1 / np.asarray(spacing, float)) @ np.asarray(direction, float).reshape(3, 3).T
    step = to_label @ np.asarray(fixed.GetDirection(), float).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    offset = to_label @ (np.asarray(fixed.GetOrigin(), float) - np.asarray(origin, float))
    voxels = [np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
              for axis, n in enumerate(shift.shape[:3])]  # z, y, x
    coordinates = []  # per label axis z, y, x: the label index each fixed voxel lands on, flat over the fixed grid
    for axis in (2, 1, 0):
        c = sum(np.float32(step[axis, k]) * voxels[2 - k] for k in range(3)) + np.float32(offset[axis])
        coordinates.append((c + sum(np.float32(to_label[axis, k]) * shift[..., k] for k in range(3))).ravel())
    del shift, field
    shape = tuple(fixed.GetSize()[::-1])
    fresh = out is None
    if fresh:
        out = class_last_zeros(len(indices), shape)
    if out.dtype != np.float32 or out.shape != (len(indices), *shape):
        raise ValueError(f"warp_masks: out must be float32 {(len(indices), *shape)}, not {out.dtype} {out.shape}")
    if not len(indices):
        return out
    rows = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)  # label value -> its row in `out` + 1; 0: none
    for row, index in enumerate(indices):
        if 0 < index < rows.size:
            rows[index] = row + 1
    row_of = rows[labels]
    # a fixed voxel reads the 2 x 2 x 2 label voxels from floor(its point) up: one near no mask is skipped
    near = ndimage.maximum_filter(row_of > 0, size=2, origin=-1, mode="nearest").ravel()
    row_of = row_of.ravel()
    strides = (labels.shape[1] * labels.shape[2], labels.shape[2], 1)
    for start in range(0, coordinates[0].size, WARP_BLOCK_VOXELS):
        points = [c[start:start + WARP_BLOCK_VOXELS] for c in coordinates]
        # ITK's rule: a point within half a voxel of the labels' grid takes its edge voxels, one further out is 0
        inside = np.ones(points[0].shape, dtype=bool)
        for c, n in zip(points, labels.shape):
            inside &= (c >= -0.5) & (c <= n - 0.5)
        voxel = np.flatnonzero(inside)
        points = [c[voxel] for c in points]
        lows = [np.floor(c) for c in points]
        first = [np.clip(low.astype(np.int64), 0, n - 1) for low, n in zip(lows, labels.shape)]
        keep = np.flatnonzero(near[sum(f * stride for f, stride in zip(first, strides))])
        if not keep.size:
            continue
        place = np.unravel_index(voxel[keep] + start, shape)  # z, y, x in `out`
        corners = []  # per axis: (flat offset, weight) of the lower and the upper neighbour, clamped to the grid
        for c, low, f, n, stride in zip(points, lows, first, labels.shape, strides):
            upper = c[keep] - low[keep]
            above = np.clip(low[keep].astype(np.int64) + 1, 0, n - 1)
            corners.append([(f[keep] * stride, 1 - upper), (above * stride, upper)])
        for (z, wz), (y, wy), (x, wx) in itertools.product(*corners):
            row = row_of[z + y + x]
            hit = np.flatnonzero(row)
            # within one corner each fixed voxel appears once: the fancy-indexed += adds without collisions
            out[(row[hit] - 1, *(p[hit] for p in place))] += wz[hit] * wy[hit] * wx[hit]
    if fresh:  # a running sum in `out` is its caller's to bound
        at_most_one(out)
    return out


def class_last_zeros(classes: int, shape: Sequence[int]) -> np.ndarray:
    """Zeros (classes, *shape) float32 whose class axis has stride 1, the layout of the network's logits in the
    original geometry (export.resample_to_cropped_shape): the fusion then reads both in one pass, not one per class."""
    return np.zeros((*shape, classes), dtype=np.float32).transpose(3, 0, 1, 2)


SLAB_ELEMENTS = 1 << 22  # at_most_one and the fusion work on slabs of about this many values (16 MB of float32)


def slabs(shape: Sequence[int]) -> list[tuple[slice, slice]]:
    """Index tuples cutting (K, Z, ...) arrays along Z into slabs of about SLAB_ELEMENTS values."""
    step = max(1, SLAB_ELEMENTS // max(1, int(np.prod(shape)) // max(1, shape[1])))
    return [(slice(None), slice(z, z + step)) for z in range(0, shape[1], step)]


def at_most_one(maps: np.ndarray) -> None:
    """Clip (K, Z, ...) soft masks to 1 in place: warp_masks' float32 sums of 8 weights can pass it by an ulp (a NaN
    for a logit). Writes only where one does: pages no mask reached stay unwritten (a brain's 85 maps are 1.8 GB)."""
    for slab in slabs(maps.shape):
        block = maps[slab]
        np.minimum(block, 1, out=block, where=block > 1)


