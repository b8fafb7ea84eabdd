"""The position prior read through an affine registration of query to reference (inference/alignment.py)."""
from __future__ import annotations

import math

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error
from scipy.ndimage import gaussian_filter, map_coordinates

from iris_nnu.inference import IrisPredictor, parse_reference
from iris_nnu.inference.alignment import (
    aligned_frame,
    alignment_anchor,
    frames_transform,
    priors_onto,
    transform_frame,
)
from iris_nnu.inference.evaluate import dice_per_class
from iris_nnu.inference.predict import main as predict_main
from iris_nnu.inference.predictor import fuse_with_atlas
from iris_nnu.inference.registration import (RegistrationAtlas, hidden_edge_share, registered_label_maps,
                                             sampled_field, warp_masks)
from iris_nnu.inference.strategies import HIDDEN_EDGE_FACTOR, HIDDEN_EDGE_SHARE, SIMILARITY_SHARE, hidden_edge_line
from iris_nnu.model import TaskEmbedding
from iris_nnu.model.position import ScanFrame, position_prior_from_labels

DEMO = Path(__file__).resolve().parents[1] / "iris_nnu" / "demo_data" / "Dataset001_Hippocampus"
REFERENCE = f"{DEMO}/imagesTr/hippocampus_004_0000.nii.gz:{DEMO}/labelsTr/hippocampus_004.nii.gz"
QUERIES = ("026", "040", "041")


def test_frames_transform_and_transform_frame_are_inverse():
    """The frames' match as a transform, read back as a frame, is the query's own frame (anisotropic spacing)."""
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    query = ScanFrame.from_dict({"centre": [10, 20, 30], "axes": np.diag([0.1, 0.2, 0.3]) @ rotation})
    reference = ScanFrame.from_dict({"centre": [15, 22, 28], "axes": np.diag([0.12, 0.25, 0.2])})
    frame = transform_frame(frames_transform(query, reference, (1.5, 1.5, 2.0)), reference, (1.5, 1.5, 2.0))
    np.testing.assert_allclose(frame.centre, query.centre, atol=1e-9)
    np.testing.assert_allclose(frame.axes, query.axes, atol=1e-12)


def _textured_body(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    texture = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    return np.where(body, 1 + texture / texture.std(), 0).astype(np.float32)


def test_registration_finds_the_voxel_the_frames_miss():
    """A query showing the reference's body moved by (4, -3, 2) voxels with an extra slab of tissue (another field
    of view): its body frame is pulled off, the registration puts each voxel where it belongs in the reference."""
    reference = _textured_body((48, 48, 40), seed=1)
    query = np.zeros((60, 48, 40), np.float32)
    query[4:52, :, :] = np.roll(reference, (-3, 2), axis=(1, 2))
    query[52:, 8:40, 8:32] = 1.0  # tissue the reference's field of view lacks
    frames = (ScanFrame.of(query > 0), ScanFrame.of(reference > 0))
    anchor = alignment_anchor(reference[None], frames[1], (2.0, 2.0, 2.0))
    aligned = aligned_frame(query[None], frames[0], anchor)
    points = torch.tensor([[20.0, 20.0, 20.0], [30.0, 25.0, 15.0], [14.0, 30.0, 24.0]])
    truth = frames[1].grid_coordinates(points)
    in_query = points + torch.tensor([4.0, -3.0, 2.0])
    error_frames = (frames[0].grid_coordinates(in_query) - truth).norm(dim=1).max().item()
    error_aligned = (aligned.grid_coordinates(in_query) - truth).norm(dim=1).max().item()
    assert error_aligned < error_frames / 3, (error_aligned, error_frames)


def test_an_ensemble_s_priors_are_carried_onto_its_first_reference_s_grid():
    """A second reference showing the first's body moved and with more tissue: its prior of a structure, carried onto
    the first reference's grid by priors_onto, lies where the first reference's own prior of it lies."""
    first = _textured_body((48, 48, 40), seed=1)
    second = np.zeros((72, 48, 40), np.float32)
    second[4:52, :, :] = np.roll(first, (-3, 2), axis=(1, 2))
    second[52:, 8:40, 8:32] = 1.0
    labels_first = np.zeros(first.shape, np.int16)
    labels_first[14:22, 26:34, 10:16] = 1  # a structure off the body's centre
    labels_second = np.zeros(second.shape, np.int16)
    labels_second[4:52] = np.roll(labels_first, (-3, 2), axis=(1, 2))
    frames = [ScanFrame.of(image > 0) for image in (first, second)]
    anchors = [alignment_anchor(image[None], frame, (2.0, 2.0, 2.0)) for image, frame in zip((first, second), frames)]
    priors = [position_prior_from_labels(torch.from_numpy(labels), [1], 32, frame)
              for labels, frame in zip((labels_first, labels_second), frames)]
    moved = priors_onto(anchors[0], anchors[1], priors[1])
    assert moved.shape == priors[0].shape and float(moved.max()) == pytest.approx(1.0)

    def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum() / (a.norm() * b.norm()))
    assert overlap(moved, priors[0]) > 0.9
    assert overlap(moved, priors[0]) > overlap(priors[1], priors[0]) + 0.1, (overlap(moved, priors[0]),
                                                                             overlap(priors[1], priors[0]))


def _one_shot_dice(predictor: IrisPredictor, task, queries: dict[str, tuple[str, sitk.Image]]) -> dict[str, float]:
    out = {}
    for name, (image_file, label) in queries.items():
        result = predictor.predict_case([image_file], task)
        dice = dice_per_class(sitk.GetArrayFromImage(label), result.segmentation, [1, 2])
        out[name] = float(np.nanmean(list(dice.values())))
    return out


@pytest.fixture(scope="module")
def cut_queries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, sitk.Image]]:
    """The bundled held-out hippocampi, whole and with their first 10 slices cut off (a field of view that the
    reference does not share, which moves the body frame)."""
    folder = tmp_path_factory.mktemp("queries")
    queries = {}
    for case in QUERIES:
        image = sitk.ReadImage(f"{DEMO}/imagesTr/hippocampus_{case}_0000.nii.gz")
        label = sitk.ReadImage(f"{DEMO}/labelsTr/hippocampus_{case}.nii.gz")
        for cut in (0, 10):
            name = f"hippocampus_{case}_cut{cut}"
            sitk.WriteImage(image[:, :, cut:], str(folder / f"{name}_0000.nii.gz"))
            queries[name] = (str(folder / f"{name}_0000.nii.gz"), label[:, :, cut:])
    return queries


def test_affine_prior_recovers_queries_of_another_field_of_view(cut_queries):
    """The bundled model, one-shot from one reference: on queries cut short the affine prior segments far better than
    the frames' (measured 0.45 -> 0.62 mean Dice), and no worse on the whole queries."""
    dice = {}
    for alignment in ("frames", "affine"):
        predictor = IrisPredictor(prior_alignment=alignment)
        predictor.initialize_from_model_folder(None)
        encoded = predictor.encode_references(parse_reference(REFERENCE, 1))
        assert len(encoded.anchors) == 1
        task, _ = predictor.task_for_strategy(encoded.pool, "oneshot")
        dice[alignment] = _one_shot_dice(predictor, task, cut_queries)
    cut = {a: np.mean([v for k, v in d.items() if k.endswith("cut10")]) for a, d in dice.items()}
    whole = {a: np.mean([v for k, v in d.items() if k.endswith("cut0")]) for a, d in dice.items()}
    assert cut["affine"] > cut["frames"] + 0.08, dice
    assert whole["affine"] > whole["frames"] - 0.02, dice
    assert whole["affine"] > 0.8, dice


def test_a_task_file_reads_the_prior_through_the_frames(tmp_path: Path, cut_queries, capsys):
    """A task file holds no reference image: --task segments as -r with --prior_alignment frames (said in one line),
    and -r with the default affine alignment segments the cut query differently."""
    name = "hippocampus_026_cut10"
    query = tmp_path / "in"
    query.mkdir()
    (query / f"{name}_0000.nii.gz").symlink_to(cut_queries[name][0])
    task = tmp_path / "task.pt"
    # by the network alone, as a task file segments: the prior's alignment is what differs
    assert predict_main(["-i", str(query), "-o", str(tmp_path / "frames"), "-r", REFERENCE,
                         "--prior_alignment", "frames", "--save_task", str(task), "--registration_fusion", "off"]) == 0
    assert predict_main(["-i", str(query), "-o", str(tmp_path / "affine"), "-r", REFERENCE,
                         "--registration_fusion", "off"]) == 0
    capsys.readouterr()
    assert predict_main(["-i", str(query), "-o", str(tmp_path / "task"), "--task", str(task)]) == 0
    assert "read through the scans' frames" in capsys.readouterr().out

    def labels(folder: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / f"{name}.nii.gz")))
    np.testing.assert_array_equal(labels("task"), labels("frames"))
    truth = sitk.GetArrayFromImage(cut_queries[name][1])
    affine, frames = (float(np.nanmean(list(dice_per_class(truth, labels(f), [1, 2]).values())))
                      for f in ("affine", "frames"))
    assert affine > frames + 0.05, (affine, frames)


def _deformed(volume: np.ndarray, order: int) -> np.ndarray:
    """`volume` moved by (3, -2, 1) voxels and bent: the first axis stretched by up to 3 voxels along the second."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in volume.shape], indexing="ij"))
    bend = 3 * np.sin(np.pi * grid[1] / volume.shape[1])
    source = grid - np.array([3, -2, 1], dtype=float)[:, None, None, None]
    source[0] -= bend
    return map_coordinates(volume, source, order=order, mode="constant")


def test_registered_label_maps_follow_a_deformed_query():
    """A query showing the reference's body moved and bent: the reference's labels carried onto it by the fusion's
    registration overlap the query's own far better than the labels left in place; a class only one reference holds
    gets that reference's map, and a class none holds stays 0."""
    reference = _textured_body((48, 48, 40), seed=3)
    labels = np.zeros(reference.shape, np.int16)
    labels[12:22, 14:26, 10:20] = 1
    labels[26:38, 24:36, 18:30] = 2
    query = _deformed(reference, 1)
    truth = _deformed(labels, 0)
    spacing = (2.0, 2.0, 2.0)
    atlas = RegistrationAtlas(reference, labels, (5, 7), spacing)  # label index i is value (5, 7)[i - 1]
    registered = registered_label_maps(query, spacing, [atlas], [5, 7, 9])
    maps = registered.maps
    # the query looks like the registered reference; an unrelated body of the same shape, less than
    # --registration_fusion auto's floor asks (the demons' fine level makes any pair look more alike: 0.74 against 0.99)
    assert registered.similarity > 0.9, registered.similarity
    unrelated = RegistrationAtlas(_textured_body(reference.shape, seed=11), labels, (5, 7), spacing)
    other = registered_label_maps(query, spacing, [unrelated], [5])
    assert other.similarity < SIMILARITY_SHARE * registered.similarity - 0.03, (other.similarity, registered.similarity)
    assert maps.shape == (3, *query.shape) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1 and not maps[2].any()
    for k, index in enumerate((1, 2)):
        moved = dice_per_class((truth == index).astype(int), (maps[k] > 0.5).astype(int), [1])[1]
        left = dice_per_class((truth == index).astype(int), (labels == index).astype(int), [1])[1]
        assert moved > 0.85 and moved > left + 0.2, (index, moved, left)
    only_first = RegistrationAtlas(reference, (labels == 1).astype(np.int16), (5,), spacing)
    both = registered_label_maps(query, spacing, [atlas, only_first], [5, 7]).maps
    # class 7: the first reference's map alone; class 5: two maps of the same registration averaged (a registration
    # repeated agrees to rounding in ITK's multithreaded sums: compared as masks)
    for k in (0, 1):
        again = dice_per_class((maps[k] > 0.5).astype(int), (both[k] > 0.5).astype(int), [1])[1]
        assert again > 0.98, (k, again)


def _moved_and_bent_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A reference (48 x 48 x 40 voxels of 2 mm: a grid too short for the B-spline) with one labelled box, and a
    query moved and bent from it with its true labels."""
    reference = _textured_body((48, 48, 40), seed=3)
    labels = np.zeros(reference.shape, np.int16)
    labels[12:22, 14:26, 10:20] = 1
    return reference, labels, _deformed(reference, 1), _deformed(labels, 0)


def test_a_b_spline_that_fails_leaves_the_affine_and_demons(monkeypatch):
    """L-BFGS-B can step the B-spline off the moving scan (SimpleITK raises): the registration keeps its affine and
    demons instead of failing, and still carries the labels onto a moved and bent query."""
    import iris_nnu.inference.registration as registration

    real_method = registration._method
    failures = []

    class FailingMethod:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def Execute(self, *args):  # noqa: N802 - SimpleITK's name
            failures.append(args)
            raise RuntimeError("All samples map outside moving image buffer")

    monkeypatch.setattr(registration, "_method", lambda grid, stage, *args: (
        FailingMethod() if stage == "bspline" else real_method(grid, stage, *args)))
    monkeypatch.setattr(registration, "MIN_BSPLINE_GRID_VOXELS", 0)  # this small grid would skip the B-spline
    reference, labels, query, truth = _moved_and_bent_pair()
    maps = registered_label_maps(query, (2.0, 2.0, 2.0), [RegistrationAtlas(reference, labels, (1,), (2.0,) * 3)],
                                 [1]).maps
    assert len(failures) == 1
    moved = dice_per_class((truth == 1).astype(int), (maps[0] > 0.5).astype(int), [1])[1]
    assert moved > 0.8, moved


def test_a_grid_shorter_than_the_b_splines_minimum_skips_it(monkeypatch):
    """Crops as small as the hippocampus's register by affine and demons alone (MIN_BSPLINE_GRID_VOXELS): no B-spline
    is optimised, and the labels still land on a moved and bent query."""
    import iris_nnu.inference.registration as registration

    real_method = registration._method
    stages = []
    monkeypatch.setattr(registration, "_method", lambda grid, stage, *args: (
        stages.append(stage) or real_method(grid, stage, *args)))
    reference, labels, query, truth = _moved_and_bent_pair()
    atlas = RegistrationAtlas(reference, labels, (1,), (2.0,) * 3)
    maps = registered_label_maps(query, (2.0, 2.0, 2.0), [atlas], [1]).maps
    assert stages == ["affine"]
    moved = dice_per_class((truth == 1).astype(int), (maps[0] > 0.5).astype(int), [1])[1]
    assert moved > 0.8, moved
    monkeypatch.setattr(registration, "MIN_BSPLINE_GRID_VOXELS", 40)  # the grid's shortest axis: optimised
    registered_label_maps(query, (2.0, 2.0, 2.0), [atlas], [1])
    assert stages == ["affine", "affine", "bspline"]


def test_demons_refine_on_a_finer_grid_where_the_scan_has_one(monkeypatch):
    """The demons run on a 3 mm grid (no finer than the scan's registration grid), then once more on the scan's
    fine_demons_grid where that is finer along every axis: on a 2 mm scan, whose first demons grid is 2.5 mm (at least
    MIN_GRID_VOXELS along its shortest axis), a second level at 2 mm; none on a 4 mm scan, nor under FINE_DEMONS_VOXELS
    too small for more, nor on a scan of 4 mm voxels and 2.5 mm slices (as the head-and-neck CTs) whose capped fine
    grid (3.05 mm) would hold more voxels but coarser slices. The labels land every time, and the fine grids (query's
    and reference's) are made only where the second level runs."""
    import iris_nnu.inference.registration as registration

    real_field, real_fine_grid = registration._demons_field, registration.fine_demons_grid
    grids, fine_grids = [], []
    monkeypatch.setattr(registration, "_demons_field", lambda fixed, *args: (
        grids.append(fixed.GetSpacing()[0]) or real_field(fixed, *args)))
    monkeypatch.setattr(registration, "fine_demons_grid", lambda image: (
        fine_grids.append(image.GetSize()) or real_fine_grid(image)))
    reference, labels, query, truth = _moved_and_bent_pair()
    default = registration.FINE_DEMONS_VOXELS
    for spacing, cap, expected in (((2.0,) * 3, default, [2.5, 2.0]), ((4.0,) * 3, default, [4.0]),
                                   ((2.0,) * 3, 10_000, [2.5]), ((2.5, 4.0, 4.0), 130_000, [4.0])):
        grids.clear()
        fine_grids.clear()
        monkeypatch.setattr(registration, "FINE_DEMONS_VOXELS", cap)
        atlas = RegistrationAtlas(reference, labels, (1,), spacing)
        maps = registered_label_maps(query, spacing, [atlas], [1]).maps
        assert grids == pytest.approx(expected), (spacing, cap, grids)
        assert len(fine_grids) == 2 * (len(expected) - 1), (spacing, cap, fine_grids)
        moved = dice_per_class((truth == 1).astype(int), (maps[0] > 0.5).astype(int), [1])[1]
        assert moved > 0.8, (spacing, cap, moved)


def test_a_query_registers_over_its_body_box_alone(monkeypatch):
    """A CT registers by its body's box (plans.ORIGINAL_BODY_BOX_KEY): the registration's grid holds the box alone,
    the labels land inside it as on the scan without the air around, and nothing lands outside it."""
    import iris_nnu.inference.registration as registration

    real_transform = registration.grid_transform
    grids = []
    monkeypatch.setattr(registration, "grid_transform", lambda fixed, *args, **kwargs: (
        grids.append(fixed.GetSize()) or real_transform(fixed, *args, **kwargs)))
    reference, labels, query, truth = _moved_and_bent_pair()
    padding = ((6, 10), (12, 4), (8, 8))
    air = np.pad(query, padding)
    body = [[before, before + n] for (before, _), n in zip(padding, query.shape)]
    atlas = RegistrationAtlas(reference, labels, (1,), (2.0,) * 3)
    maps = registered_label_maps(air, (2.0, 2.0, 2.0), [atlas], [1], body=body).maps
    assert grids == [query.shape[::-1]]  # SimpleITK's (x, y, z)
    region = tuple(slice(lo, hi) for lo, hi in body)
    outside = np.ones(air.shape, bool)
    outside[region] = False
    assert maps.shape == (1, *air.shape) and not maps[0][outside].any()
    moved = dice_per_class((truth == 1).astype(int), (maps[0][region] > 0.5).astype(int), [1])[1]
    assert moved > 0.8, moved


def test_warp_masks_matches_one_resample_per_mask():
    """warp_masks (the transform evaluated once, each mask interpolated near its box) gives what one sitk.Resample
    per mask gives, for grids with their own origins, spacings and rotated axes, a B-spline on top of an affine, a
    mask the transform carries out of the fixed grid (all 0) and an index the labels lack (all 0)."""
    rng = np.random.default_rng(0)
    labels = np.zeros((30, 36, 40), np.int16)
    labels[5:12, 8:20, 10:22] = 1
    labels[14:25, 20:30, 18:35] = 2
    labels[0:3, 0:4, 0:5] = 3  # a corner the transform moves off the fixed grid
    labels[20:26, 2:9, 3:11] = 4
    moving = sitk.GetImageFromArray(labels)
    moving.SetSpacing((1.1, 0.9, 1.7))
    moving.SetOrigin((4.0, -3.0, 10.0))
    angle = 0.3
    moving.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    fixed = sitk.Image(38, 34, 26, sitk.sitkFloat32)
    fixed.SetSpacing((1.0, 1.2, 1.5))
    fixed.SetOrigin((2.0, 1.0, 12.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((np.eye(3) + rng.normal(0, 0.05, (3, 3))).ravel().tolist())
    affine.SetTranslation((3.0, -8.0, 2.0))
    affine.SetCenter((20.0, 20.0, 30.0))
    bspline = sitk.BSplineTransformInitializer(fixed, [3, 3, 3], 3)
    bspline.SetParameters(rng.normal(0, 1.5, len(bspline.GetParameters())).tolist())
    transform = sitk.CompositeTransform([affine, bspline])
    indices = [1, 2, 3, 4, 9]
    warped = warp_masks(transform, fixed, labels, indices, moving.GetSpacing(), moving.GetOrigin(),
                        moving.GetDirection())
    for index, ours in zip(indices, warped):
        mask = sitk.Cast(moving == index, sitk.sitkFloat32)
        resampled = sitk.GetArrayFromImage(sitk.Resample(mask, fixed, transform, sitk.sitkLinear, 0.0,
                                                         sitk.sitkFloat32))
        assert ours.shape == resampled.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, resampled, atol=1e-4, err_msg=f"mask {index}")
    assert warped[0].sum() > 100 and warped[1].sum() > 100 and not warped[4].any()
    # added into a running sum that is a view of a larger array (a CT's body box), index 0 (background) left out
    maps = np.ones((3, 30, 40, 44), np.float32)
    view = maps[:, 2:28, 3:37, 4:42]
    warp_masks(transform, fixed, labels, [2, 0, 4], moving.GetSpacing(), moving.GetOrigin(), moving.GetDirection(),
               out=view)
    np.testing.assert_allclose(view[0], 1 + warped[1], atol=1e-6)
    np.testing.assert_array_equal(view[1], 1)
    np.testing.assert_allclose(view[2], 1 + warped[3], atol=1e-6)
    assert (maps[:, :2] == 1).all() and (maps[:, :, :, 42:] == 1).all()
    assert warp_masks(transform, fixed, labels, [], moving.GetSpacing()).shape == (0, 26, 34, 38)


def test_a_b_spline_sampled_on_its_grid_moves_points_as_the_b_spline_does():
    """sampled_field (the B-spline as a field on the registration grid, interpolated linearly) lands points within a
    fiftieth of a millimetre of where the B-spline itself does, for displacements of several millimetres, and
    leaves points outside the grid where they are, as the B-spline does."""
    grid = sitk.Image(100, 90, 60, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.5))
    grid.SetOrigin((-30.0, 10.0, 5.0))
    bspline = sitk.BSplineTransformInitializer(grid, [3, 3, 3], 3)
    bspline.SetParameters(np.random.default_rng(1).normal(0, 8.0, len(bspline.GetParameters())).tolist())
    sampled = sampled_field(bspline, grid)
    rng = np.random.default_rng(2)
    low, high = np.asarray(grid.GetOrigin()), np.asarray(grid.TransformIndexToPhysicalPoint(
        [n - 1 for n in grid.GetSize()]))
    moved, errors = [], []
    for point in rng.uniform(low, high, (500, 3)):
        exact = np.asarray(bspline.TransformPoint(point.tolist()))
        moved.append(np.linalg.norm(exact - point))
        errors.append(np.linalg.norm(np.asarray(sampled.TransformPoint(point.tolist())) - exact))
    assert np.median(moved) > 3 and max(errors) < 0.02, (np.median(moved), max(errors))
    outside = (float(low[0]) - 50, 50.0, 50.0)
    assert sampled.TransformPoint(outside) == pytest.approx(outside)


def test_registration_fusion_segments_and_needs_the_references(tmp_path: Path, capsys):
    """iris_predict --registration_fusion: segments a held-out hippocampus at the threshold calibrated for the network
    (said in one line) differently from the network alone and still well; refused with a task file (no reference
    image to register)."""
    query = tmp_path / "in"
    query.mkdir()
    (query / "hippocampus_026_0000.nii.gz").symlink_to(f"{DEMO}/imagesTr/hippocampus_026_0000.nii.gz")
    task = tmp_path / "task.pt"
    assert predict_main(["-i", str(query), "-o", str(tmp_path / "alone"), "-r", REFERENCE,
                         "--save_task", str(task), "--registration_fusion", "off"]) == 0
    capsys.readouterr()
    assert predict_main(["-i", str(query), "-o", str(tmp_path / "fused"), "-r", REFERENCE,
                         "--registration_fusion"]) == 0
    out = capsys.readouterr().out
    assert "decision threshold" in out and "from the references" in out, out
    truth = sitk.GetArrayFromImage(sitk.ReadImage(f"{DEMO}/labelsTr/hippocampus_026.nii.gz"))
    outputs = {f: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / "hippocampus_026.nii.gz")))
               for f in ("alone", "fused")}
    assert (outputs["alone"] != outputs["fused"]).any()
    assert float(np.mean(list(dice_per_class(truth, outputs["fused"], [1, 2]).values()))) > 0.75
    line = cli_error(capsys, predict_main, "iris_predict", ["-i", str(query), "-o", str(tmp_path / "task"),
                                                             "--task", str(task), "--registration_fusion"])
    assert "--registration_fusion on registers the reference images" in line and "give the references" in line
    assert not (tmp_path / "task").exists()


def test_a_confident_network_outvotes_the_registration_and_an_unsure_one_follows_it():
    """fuse_with_atlas adds +-weight to the network's logit where the registered label covers a voxel or not: a
    confident network keeps its call against the registration, an unsure one (near its threshold, logit 0 here) takes
    the registration's; a class of weight inf is its registered label alone, 0 the network alone."""
    logits = np.array([[4.0, -4.0, 0.5, -0.5], [4.0, -4.0, 0.5, -0.5]], dtype=np.float32)
    atlas = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    fused = fuse_with_atlas(logits.copy(), atlas, 2.0)
    np.testing.assert_allclose(fused[0], [2.0, -2.0, -1.5, 1.5])
    assert ((fused > 0) == [[True, False, False, True]] * 2).all()
    mixed = fuse_with_atlas(logits.copy(), atlas, np.array([0.0, np.inf], dtype=np.float32))
    np.testing.assert_array_equal(mixed[0], logits[0])
    assert ((mixed[1] > 0) == atlas[1].astype(bool)).all()


def test_a_class_whose_edge_the_reference_hides_takes_a_heavier_registration_weight():
    """hidden_edge_share: a structure brighter than all around it shows its whole edge (0); one as bright as the
    tissue it lies in hides it (near 1). fusion_weights multiplies a fused class's
    weight by hidden_edge_factor where the share, averaged over the references holding it, reaches HIDDEN_EDGE_SHARE;
    a class the network segments alone (0) or the registration alone (inf) keeps its weight, and factor 1 changes
    nothing."""
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 2.0, (24, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.int16)
    labels[4:10, 4:10, 4:10] = 1
    image[4:10, 4:10, 4:10] += 50  # shows its edge
    labels[12:20, 12:20, 12:20] = 2  # the tissue's own intensity: no edge to see
    atlas = RegistrationAtlas(image, labels, (3, 7), (1.0, 1.0, 1.0))
    assert atlas.hidden_edges[3] == 0.0 and atlas.hidden_edges[7] > 0.7
    assert hidden_edge_share(image, labels, 2) == atlas.hidden_edges[7]
    with pytest.raises(ValueError, match="no voxel of index 3"):
        hidden_edge_share(image, labels, 3)
    predictor = IrisPredictor(registration_fusion=True, registration_weight=2.0)
    predictor.registration_atlases = [atlas]
    assert predictor.hidden_edge_factor == HIDDEN_EDGE_FACTOR > 1
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, 2.0 * HIDDEN_EDGE_FACTOR])
    assert hidden_edge_line(predictor, [3, 7]).endswith("for 1 fused class(es) whose edges the references' images "
                                                       "hide (hidden edge share 0.2 or more): 7")
    shown = RegistrationAtlas(image + 50.0 * (labels == 2), labels, (3, 7), (1.0, 1.0, 1.0))
    assert shown.hidden_edges[7] == 0.0
    predictor.registration_atlases = [shown]
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, 2.0])
    predictor.registration_atlases = [atlas, shown]  # hidden in one of two: the mean decides
    assert (atlas.hidden_edges[7] + shown.hidden_edges[7]) / 2 >= HIDDEN_EDGE_SHARE
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, 2.0 * HIDDEN_EDGE_FACTOR])
    predictor.registration_atlases = [atlas]
    predictor.class_registration_weights = {3: 2.0, 7: math.inf}
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, math.inf])
    predictor.class_registration_weights = {3: 2.0}
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, 0.0])
    predictor.class_registration_weights = None
    predictor.hidden_edge_factor = 1.0
    np.testing.assert_array_equal(predictor.fusion_weights([3, 7]), [2.0, 2.0])
    assert hidden_edge_line(predictor, [3, 7]) is None


def _fusion_run(tmp_path: Path, capsys, name: str, references: list[str], *options: str) -> tuple[np.ndarray, str]:
    query = tmp_path / "in"
    if not query.exists():
        query.mkdir()
        (query / "hippocampus_026_0000.nii.gz").symlink_to(f"{DEMO}/imagesTr/hippocampus_026_0000.nii.gz")
    capsys.readouterr()
    args = ["-i", str(query), "-o", str(tmp_path / name), "-r", *references]
    assert predict_main(args + list(options)) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err  # a query's warnings go to stderr
    return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "hippocampus_026.nii.gz"))), out


def test_registration_fusion_auto_is_measured_on_the_references(tmp_path: Path, capsys, monkeypatch):
    """--registration_fusion auto (the default): with two references, the second is segmented from the first by the
    network alone, fused and by the registration alone, the best kept, said in a line with the three scores, and the
    run is then the one that setting gives. With one reference nothing measures it and every class is fused, said
    once. A comparison that favours fusion or the registration turns it on."""
    import iris_nnu.inference.predictor as predictor_module
    import iris_nnu.inference.strategies as strategies

    # the runs compared below are repeatable: conftest runs ITK on one thread (the registration alone showed 45
    # voxels of difference between two runs with 2 threads)
    # every class at one weight, so that one setting wins for both (with the posterior's weight raised for its hidden
    # edge the two classes choose apart; that rule has its own test)
    monkeypatch.setattr(predictor_module, "HIDDEN_EDGE_FACTOR", 1.0)

    second = f"{DEMO}/imagesTr/hippocampus_040_0000.nii.gz:{DEMO}/labelsTr/hippocampus_040.nii.gz"
    prepared = []
    prepare = predictor_module.prepare_reference
    monkeypatch.setattr(predictor_module, "prepare_reference",
                        lambda case, *args: prepared.append(case.name) or prepare(case, *args))
    auto, out = _fusion_run(tmp_path, capsys, "auto", [REFERENCE, second])
    assert prepared == ["hippocampus_004", "hippocampus_040"]  # the first, measured on, is not prepared again
    measured = re.search(r"registration fusion (off|on|registration): hippocampus_040 segmented from hippocampus_004 "
                         r"scores (.*?)(;|$)", out, re.MULTILINE)
    assert measured, out
    scores = {s: float(re.search(rf"(\d\.\d{{3}}) {d}", measured[2])[1])
              for s, d in strategies.FUSION_DESCRIPTIONS.items()}
    chosen = measured[1]
    assert scores[chosen] == max(scores.values()) and scores["off"] > 0.5, measured[0]
    off, _ = _fusion_run(tmp_path, capsys, "off", [REFERENCE, second], "--registration_fusion", "off")
    forced = off if chosen == "off" else _fusion_run(tmp_path, capsys, "forced", [REFERENCE, second],
                                                     "--registration_fusion", chosen)[0]
    assert int((auto != forced).sum()) <= 20, chosen  # a few voxels, should ITK's threads still differ
    # one reference: a crop such as this hippocampus's (36 mm) is left to the network alone, a longer one is fused
    one, out = _fusion_run(tmp_path, capsys, "one", [REFERENCE])
    assert "registration fusion off: the reference is a crop (36 mm along its shortest axis, under 100 mm)" in out, out
    one_off, _ = _fusion_run(tmp_path, capsys, "one_off", [REFERENCE], "--registration_fusion", "off")
    assert np.array_equal(one, one_off)
    monkeypatch.setattr(strategies, "CROP_EXTENT_MM", 30.0)
    one, out = _fusion_run(tmp_path, capsys, "one_long", [REFERENCE])
    assert "registration fusion on: with one reference the network's decision is moved by its label" in out, out
    one_on, _ = _fusion_run(tmp_path, capsys, "one_on", [REFERENCE], "--registration_fusion", "on")
    assert int((one != one_on).sum()) <= 20 and int((one != one_off).sum()) > 0
    outputs = {}
    for setting in ("on", "registration"):
        means = {"off": 0.4, "on": 0.5, "registration": 0.3} if setting == "on" else \
            {"off": 0.4, "on": 0.5, "registration": 0.6}
        scores = {s: {1: m, 2: m} for s, m in means.items()}  # every class favours `setting`
        # the references registered alike at 0.5: the query's registration (near 1, crops of one region) is used
        monkeypatch.setattr(strategies, "fusion_comparison",
                            lambda *args, scores=scores: strategies.FusionComparison(scores, 0.5))
        favoured, out = _fusion_run(tmp_path, capsys, f"favoured_{setting}", [REFERENCE, second])
        best = max(means.values())
        assert (f"registration fusion {setting}: hippocampus_040 segmented from hippocampus_004 scores {best:.3f}"
                in out), out
        assert "correlates with it below 0.40 (0.8 of the references' 0.50)" in out and "doubtful" not in out, out
        forced, _ = _fusion_run(tmp_path, capsys, setting, [REFERENCE, second], "--registration_fusion", setting)
        # the same run (at most a few voxels apart, should ITK's threads still differ)
        jitter, changed = int((favoured != forced).sum()), int((favoured != off).sum())
        assert jitter <= 20 and changed > 100, (setting, jitter, changed)
        outputs[setting] = forced
    assert int((outputs["on"] != outputs["registration"]).sum()) > 100
    # classes that disagree: anterior (1) by the network alone, posterior (2) fused, both at the calibrated threshold
    scores = {"off": {1: 0.6, 2: 0.4}, "on": {1: 0.5, 2: 0.5}, "registration": {1: 0.3, 2: 0.3}}
    monkeypatch.setattr(strategies, "fusion_comparison", lambda *args: strategies.FusionComparison(scores, 0.5))
    mixed, out = _fusion_run(tmp_path, capsys, "per_class", [REFERENCE, second])
    assert ("registration fusion per class: hippocampus_040 segmented from hippocampus_004 scores 0.550 with the "
            "network alone for 1, fused for 1 of its 2 classes" in out), out
    for value, alike in ((1, off), (2, outputs["on"])):
        overlap = 2 * ((mixed == value) & (alike == value)).sum() / ((mixed == value).sum() + (alike == value).sum())
        assert overlap > 0.9, (value, overlap)
    assert int((mixed != off).sum()) > 50 and int((mixed != outputs["on"]).sum()) > 50
    # references that registered onto each other far better than any query can (correlation above 1): the query's
    # registration is doubted, said in its warning, and it is segmented as the network alone segments it, at the
    # threshold calibrated on the references although every class was to be segmented by the registration
    registered = {"off": {1: 0.3, 2: 0.3}, "on": {1: 0.4, 2: 0.4}, "registration": {1: 0.6, 2: 0.6}}
    monkeypatch.setattr(strategies, "fusion_comparison", lambda *args: strategies.FusionComparison(registered, 2.0))
    doubted, out = _fusion_run(tmp_path, capsys, "doubted", [REFERENCE, second])
    assert "registration fusion registration: " in out and "correlates with it below 1.60" in out, out
    assert "its registration to the references looks doubtful (image correlation 0." in out, out
    assert "decision threshold" in out and "from the references" in out, out
    assert int((doubted != off).sum()) <= 20 and int((doubted != outputs["registration"]).sum()) > 100


def test_a_reference_is_prepared_again_when_its_files_or_the_settings_change(tmp_path: Path, monkeypatch):
    """encode_references reuses the previous call's prepared reference only for the same files (path, size,
    modification time) at the same settings: an edited label is read again, and so is a reference first prepared
    without the registration atlas a fused run needs."""
    import iris_nnu.inference.predictor as predictor_module

    label = tmp_path / "hippocampus_004.nii.gz"
    label.write_bytes((DEMO / "labelsTr" / "hippocampus_004.nii.gz").read_bytes())
    reference = parse_reference(f"{DEMO}/imagesTr/hippocampus_004_0000.nii.gz:{label}", 1)
    prepared = []
    prepare = predictor_module.prepare_reference
    monkeypatch.setattr(predictor_module, "prepare_reference",
                        lambda case, *args: prepared.append(args[-1]) or prepare(case, *args))
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    first = predictor.encode_references(reference)
    again = predictor.encode_references(reference)
    assert len(prepared) == 1 and torch.equal(first.pool.tokens[0], again.pool.tokens[0])
    predictor.registration_fusion = True
    fused = predictor.encode_references(reference)
    assert prepared == [False, True] and len(fused.atlases) == 1
    predictor.registration_fusion = False
    assert predictor.encode_references(reference).atlases == [] and len(prepared) == 2
    truth = sitk.ReadImage(str(label))
    edited = sitk.GetArrayFromImage(truth)
    edited[edited == 2] = 0  # the posterior part removed: a reference of one class
    image = sitk.GetImageFromArray(edited)
    image.CopyInformation(truth)
    sitk.WriteImage(image, str(label))
    assert predictor.encode_references(reference).pool.classes == [1] and len(prepared) == 3


def test_a_failed_registration_leaves_the_network_alone(monkeypatch):
    """Where the fusion's registration fails (SimpleITK raises), the query is segmented as without fusion, with a
    warning saying so, instead of failing."""
    import iris_nnu.inference.registration as registration

    def fail(*args, **kwargs):
        raise RuntimeError("All samples map outside moving image buffer")
    query = [f"{DEMO}/imagesTr/hippocampus_026_0000.nii.gz"]
    outputs = {}
    for fusion in (False, True):
        predictor = IrisPredictor(registration_fusion=fusion)
        predictor.initialize_from_model_folder(None)
        encoded = predictor.encode_references(parse_reference(REFERENCE, 1))
        task, _ = predictor.task_for_strategy(encoded.pool, "oneshot")
        if fusion:
            monkeypatch.setattr(registration, "grid_transform", fail)
        outputs[fusion] = predictor.predict_case(query, task)
    np.testing.assert_array_equal(outputs[True].segmentation, outputs[False].segmentation)
    assert any("registration to the references failed" in w for w in outputs[True].warnings)
    assert not any("registration" in w for w in outputs[False].warnings)


def test_the_registration_alone_does_not_run_the_network(monkeypatch):
    """registration_weight inf (--registration_fusion registration): the query is segmented by the references' registered
    labels alone, without one forward pass of the network on it, and still matches the truth."""
    from iris_nnu.inference.segmenter import Segmenter

    predictor = IrisPredictor(registration_fusion=True, registration_weight=math.inf)
    predictor.initialize_from_model_folder(None)
    encoded = predictor.encode_references(parse_reference(REFERENCE, 1))
    task, _ = predictor.task_for_strategy(encoded.pool, "oneshot")

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran on the query")
    monkeypatch.setattr(Segmenter, "logits", no_network)
    result = predictor.predict_case([f"{DEMO}/imagesTr/hippocampus_026_0000.nii.gz"], task)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(f"{DEMO}/labelsTr/hippocampus_026.nii.gz"))
    assert float(np.mean(list(dice_per_class(truth, result.segmentation, [1, 2]).values()))) > 0.5
    with pytest.raises(ValueError, match="registration_weight"):
        IrisPredictor(registration_fusion=True, registration_weight=-1.0)


def test_a_task_saved_from_a_fused_run_records_the_networks_threshold(tmp_path: Path, capsys, monkeypatch):
    """A run by the registration alone segments at 0.5, but its --save_task file is segmented later by the network
    alone: it records the threshold calibrated for the network alone (here forced to 0.25), and the line says so. A
    fused run is decided at the network's threshold, and its task file records that one."""
    import iris_nnu.inference.strategies as strategies
    monkeypatch.setattr(strategies, "calibrated_threshold",
                        lambda *args, **kwargs: strategies.ThresholdCalibration(0.25, {0.25: 0.9, 0.5: 0.8}, 0.9))
    task = tmp_path / "task.pt"
    _, out = _fusion_run(tmp_path, capsys, "registered", [REFERENCE], "--registration_fusion", "registration",
                         "--save_task", str(task))
    assert "decision threshold 0.5: with --registration_fusion registration" in out
    assert "the task file records decision threshold 0.25, the network's alone" in out
    assert TaskEmbedding.load(task).decision_threshold == 0.25
    _, out = _fusion_run(tmp_path, capsys, "fused", [REFERENCE], "--registration_fusion", "on",
                         "--save_task", str(task), "--overwrite")
    assert "decision threshold 0.25 from the references" in out and "the task file records" not in out, out
    assert TaskEmbedding.load(task).decision_threshold == 0.25
