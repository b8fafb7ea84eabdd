"""The registration baselines of benchmarks/accuracy.py: label propagation and majority vote."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from iris_nnu.errors import IrisInputError

spec = importlib.util.spec_from_file_location(
    "accuracy_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


def ellipsoid_pair(shift: tuple[int, int, int]) -> tuple[sitk.Image, sitk.Image]:
    """An MR-like volume with two touching ellipsoids (labels 1, 2), moved by `shift` voxels."""
    z, y, x = np.mgrid[:40, :48, :44].astype(np.float32)
    cz, cy, cx = 20 + shift[2], 24 + shift[1], 22 + shift[0]
    inside = ((z - cz) / 10) ** 2 + ((y - cy) / 14) ** 2 + ((x - cx) / 9) ** 2 < 1
    label = np.where(inside, np.where(y < cy, 1, 2), 0).astype(np.uint8)
    image = np.random.default_rng(0).normal(0, 5, label.shape).astype(np.float32) + 100 * (label == 1) \
        + 60 * (label == 2) + 20
    images = [sitk.GetImageFromArray(a) for a in (image, label)]
    for im in images:
        im.SetSpacing((1.0, 1.0, 1.0))
    return images[0], images[1]


def test_registration_propagates_a_moved_label():
    fixed_image, fixed_label = ellipsoid_pair((0, 0, 0))
    moving_image, moving_label = ellipsoid_pair((4, -3, 2))
    gt = sitk.GetArrayFromImage(fixed_label)
    before = accuracy.dice_per_class(gt, sitk.GetArrayFromImage(moving_label), [1, 2])
    # seeded sampling is reproducible on one thread: ITK's multithreaded metric sums move the result by a few voxels
    # between runs (seen when an earlier test of the session left SimpleITK with more threads)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        warped = accuracy.register_label(fixed_image, moving_image, moving_label, 2.0, seed=0)
        again = accuracy.register_label(fixed_image, moving_image, moving_label, 2.0, seed=0)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert warped.GetSize() == fixed_image.GetSize()
    after = accuracy.dice_per_class(gt, sitk.GetArrayFromImage(warped), [1, 2])
    assert min(after.values()) > 0.8 > max(before.values())
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(warped))  # seeded: reproducible


def test_majority_vote_and_ties():
    maps = [np.array([1, 2, 0, 3]), np.array([1, 2, 3, 2]), np.array([2, 0, 3, 1])]
    assert accuracy.majority_vote(maps).tolist() == [1, 2, 3, 1]  # last voxel: three-way tie -> lowest value
    assert accuracy.majority_vote([np.array([0, 5]), np.array([4, 0])]).tolist() == [0, 0]
    dice = accuracy.dice_per_class(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]), [1, 2])
    assert dice[1] == 0.5 and np.isnan(dice[2])
    # a class the truth lacks is not scored, even where a method marks it (an organ there but unlabelled)
    assert accuracy.dice_per_class(np.array([1, 1, 0, 0]), np.array([1, 2, 2, 0]), [1, 2])[2] == 0.0
    dice = accuracy.labelled_dice(np.array([1, 1, 0, 0]), np.array([1, 2, 2, 0]), [1, 2])
    assert dice[1] == 2 / 3 and np.isnan(dice[2])


def test_box_alignment_carries_a_label_between_scans_of_other_extent():
    """Two 'skull-stripped' scans (zero outside the body) whose bodies lie and stretch differently: mapping the
    non-zero boxes onto each other puts the structure where the other scan has it."""
    def scan(offset: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        z, y, x = np.mgrid[:40, :48, :44].astype(np.float32)
        body = ((z - 20) / 15) ** 2 + ((y - offset - 24 * scale) / (20 * scale)) ** 2 + ((x - 22) / 18) ** 2 < 1
        structure = body & (((y - offset - 12 * scale) / (5 * scale)) ** 2 + ((z - 20) / 5) ** 2 + ((x - 22) / 5) ** 2
                            < 1)
        return np.where(body, 50.0 + 50 * structure, 0.0), structure.astype(np.uint8)

    fixed, fixed_label = scan(0, 0.9)
    moving, moving_label = scan(6, 0.75)
    before = accuracy.dice_per_class(fixed_label, moving_label, [1])[1]
    carried = accuracy.box_aligned_label(fixed, moving, moving_label)
    assert carried.shape == fixed.shape
    assert accuracy.dice_per_class(fixed_label, carried, [1])[1] > 0.8 > before + 0.3, before


def test_structures_held_out_of_training_are_reported_apart(tmp_path: Path, monkeypatch):
    """For a model whose plans held structures out of every training episode, the benchmark reports their mean Dice
    and the other structures' apart, for every method (here the posterior hippocampus, on a bundled demo query)."""
    import json
    import shutil
    import sys

    from iris_nnu.io.model_folder import DEFAULT_MODEL_FOLDER

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_FOLDER, model)
    plans = json.loads((model / "plans.json").read_text())
    plans.setdefault("iris", {})["held_out_classes"] = {"Dataset001_Hippocampus": [2]}
    (model / "plans.json").write_text(json.dumps(plans))
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps({"Dataset001_Hippocampus": ["hippocampus_026"]}))
    output = tmp_path / "accuracy.json"
    data = Path(__file__).resolve().parents[1] / "iris_nnu" / "demo_data"
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "-m", str(model), "--held_out", str(held_out), "--data",
                                      str(data), "--datasets", "1", "--queries", "1", "--n_references", "1",
                                      "--methods", "oneshot", "registration", "--output", str(output)])
    threads, itk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        assert accuracy.main() == 0
    finally:  # main sets both for its process (--threads 2): the rest of the suite keeps its own
        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    result = json.loads(output.read_text())["datasets"]["Dataset001_Hippocampus"]
    assert result["never_trained_classes"] == [2]
    for method in ("iris oneshot", "registration"):
        m = result["methods"][method]
        assert m["mean_dice_never_trained"] == m["dice_per_class"]["2"] > 0.3
        assert m["mean_dice_trained"] == m["dice_per_class"]["1"] > 0.3


def test_references_named_instead_of_picked(tmp_path):
    """--references: the named training cases become references #1, #2 in that order; a held-out or unknown case,
    or fewer cases than --n_references, is an error naming the problem."""
    (tmp_path / "labelsTr").mkdir()
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    for case in ("c1", "c2", "c3", "c4"):
        sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "labelsTr" / f"{case}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    queries, refs = accuracy.pick_cases(tmp_path, ["c4"], 1, 2, 0, ["c3", "c1"])
    assert (queries, refs) == (["c4"], ["c3", "c1"])
    with pytest.raises(IrisInputError, match="c4"):  # held out
        accuracy.pick_cases(tmp_path, ["c4"], 1, 1, 0, ["c4"])
    with pytest.raises(IrisInputError, match="n_references"):
        accuracy.pick_cases(tmp_path, ["c4"], 1, 2, 0, ["c1"])
