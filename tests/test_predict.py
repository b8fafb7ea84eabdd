"""iris_predict / IrisPredictor on a tiny random-weight model: geometry, values, strategies, task files, bad input."""
from __future__ import annotations

import dataclasses

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk
import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from conftest import cli_error
from synthetic import blob_volume, write_volume

from iris_nnu.errors import IrisInputError
from iris_nnu.inference import IrisPredictor, parse_reference, select_references, write_model_folder
from iris_nnu.inference import segmenter
from iris_nnu.inference.export import Winner, keep_largest_components, threshold_logits
from iris_nnu.inference.images import find_queries, label_to_sitk
from iris_nnu.inference.plans import BODY_BOX_KEY, RunPreprocessing, inference_plans, modality_of
from iris_nnu.inference.predict import main
from iris_nnu.inference.references import prepare_reference
from iris_nnu.model import TaskEmbedding, TaskMismatchError, build_network
from iris_nnu.model.position import ScanFrame
from iris_nnu.preprocessing.planner import MemberSummary, plan_collection

VALUES = (17, 53, 2035)  # arbitrary label values: the output must carry them
TINY = dict(features_per_stage=[4, 8, 16, 32, 64], blocks_per_stage=1, num_query_tokens=3, attention_heads=2)
SPACING = (1.1, 0.9, 1.0)  # x, y, z: resampled to the model's 1 mm


# ------------------------------------------------------------------------------------------ fixtures
def tiny_plans(modality: str = "MR") -> tuple[dict, dict]:
    """A real joint plan (iris planner) for a synthetic member, shrunk to a tiny network and a 32^3 patch."""
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[26, 30, 30]] * 3,
                   "foreground_intensity_properties_per_channel": {"0": {
                       "mean": 100.0, "std": 50.0, "median": 100.0, "min": -1000.0, "max": 600.0,
                       "percentile_00_5": -200.0, "percentile_99_5": 400.0}},
                   "median_relative_size_after_cropping": 0.9}
    dataset_json = {"channel_names": {"0": modality}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
                    "numTraining": 3, "file_ending": ".nii.gz"}
    plans = plan_collection([MemberSummary("Dataset001_Synth", dataset_json, fingerprint)], target_spacing=1.0,
                            memory_gb=0.5, orientation="LPS")
    configuration = plans["configurations"]["3d_fullres"]
    configuration["patch_size"] = [32, 32, 32]
    configuration["architecture"]["arch_kwargs"].update(TINY)
    return plans, dataset_json


def build_model_folder(folder: Path, seed: int = 0, **kwargs) -> Path:
    plans, dataset_json = tiny_plans()
    torch.manual_seed(seed)
    network = build_network(plans["configurations"]["3d_fullres"]["architecture"], input_channels=1)
    for module in network.modules():  # 10x the init scale of linears: random logits far from 0, decisive outputs
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    # a weak position prior (weight 0.13, at most -0.6 logits): random foreground is not confined to the references'
    # structures, and the prior's path still runs
    torch.nn.init.constant_(network.position_weight, -2.0)
    write_model_folder(str(folder), plans, dataset_json, network, **kwargs)
    return folder


def make_case(image_path: Path, label_path: Path | None, seed: int, shape=(26, 30, 30), spacing=SPACING,
              origin=(3.0, -4.0, 5.0), values=VALUES, direction=None) -> np.ndarray:
    """An MR-like volume with len(values) structures labelled with `values`; returns the label array."""
    image, label = blob_volume(shape, np.random.default_rng(seed), "MR", len(values))
    label = np.array([0, *values], dtype=np.uint16)[label]
    for array, path in ((image, image_path), (label, label_path)):
        if path is None:
            continue
        write_volume(array, spacing, str(path), origin=origin)
        if direction is not None:
            img = sitk.ReadImage(str(path))
            img.SetDirection(direction)
            sitk.WriteImage(img, str(path))
    return label


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A model folder, three reference pairs and two queries (one .nii.gz, one rotated .mha)."""
    root = tmp_path_factory.mktemp("predict")
    # seed: random weights whose outputs hold foreground on both queries (the geometry checks need labels)
    model = build_model_folder(root / "model", seed=5,
                               checkpoint_names=("checkpoint_final.pth", "checkpoint_best.pth"))
    refs = root / "refs"
    refs.mkdir()
    for i in range(3):
        make_case(refs / f"ref{i}.nii.gz", refs / f"ref{i}_seg.nii.gz", seed=10 + i)
    queries = root / "queries"
    queries.mkdir()
    make_case(queries / "caseA_0000.nii.gz", None, seed=20)
    rotated = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    make_case(queries / "scanB.mha", None, seed=21, shape=(24, 28, 30), spacing=(0.8, 1.2, 1.1),
              origin=(-10.0, 2.0, 7.5), direction=rotated)
    return {"root": root, "model": str(model), "refs": refs, "queries": queries,
            "ref": [f"{refs}/ref{i}.nii.gz:{refs}/ref{i}_seg.nii.gz" for i in range(3)]}


@pytest.fixture(scope="module")
def predictor(world) -> IrisPredictor:
    p = IrisPredictor(use_mirroring=False)
    p.initialize_from_model_folder(world["model"])
    return p


def run(world, *argv: str) -> None:
    """iris_predict with the synthetic model, by the network alone unless --registration_fusion is given: these tests
    compare -r runs with task files, folds, flips and the API, which segment without a registration (fusion is
    test_alignment.py's)."""
    fusion = [] if "--registration_fusion" in argv else ["--registration_fusion", "off"]
    main(["-m", world["model"], "--disable_tta", *fusion, *argv])


def read(path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def expect_error(capsys, world, *argv: str, model: bool = True) -> str:
    model_args = ["-m", world["model"]] if model else []
    return cli_error(capsys, main, "iris_predict", [*model_args, "--disable_tta", *argv])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name]


# ------------------------------------------------------------------------------- geometry and values
def test_outputs_in_each_query_geometry_with_reference_values(world, tmp_path, capsys):
    out = tmp_path / "out"
    main(["-m", world["model"], "-i", str(world["queries"]), "-o", str(out), "-r", world["ref"][0], "--tta"])
    assert "2 of 2 queries segmented" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["caseA.nii.gz", "scanB.mha"]
    for query, output in (("caseA_0000.nii.gz", "caseA.nii.gz"), ("scanB.mha", "scanB.mha")):
        seg, seg_image = read(out / output)
        _, query_image = read(world["queries"] / query)
        assert seg_image.GetSize() == query_image.GetSize()
        np.testing.assert_allclose(seg_image.GetSpacing(), query_image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(seg_image.GetOrigin(), query_image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg_image.GetDirection(), query_image.GetDirection(), atol=1e-6)
        assert set(np.unique(seg).tolist()) <= {0, *VALUES}
        assert len(set(np.unique(seg).tolist()) - {0}) >= 1
        assert seg[0, 0, 0] == 0  # outside the body: the crop to non-zero is undone with background
    assert not leftovers(out)


def test_classes_subset_and_probabilities(world, tmp_path, predictor):
    out = tmp_path / "out"
    query = world["queries"] / "caseA_0000.nii.gz"
    run(world, "-i", str(query), "-o", str(out), "-r", world["ref"][0], "--classes", "2035", "17",
        "--save_probabilities", "--threshold", "0.5", "--postprocess", "none")  # the labels as the maps say
    seg, _ = read(out / "caseA.nii.gz")
    assert set(np.unique(seg).tolist()) <= {0, 17, 2035}
    npz = np.load(out / "caseA.npz")
    probabilities, classes = npz["probabilities"], npz["classes"].tolist()
    assert classes == [17, 2035] and probabilities.shape == (2, *seg.shape)
    assert probabilities.min() >= 0 and probabilities.max() <= 1 and (out / "caseA.pkl").is_file()
    # the label map is the per-voxel winner above 0.5; compared where fp16 probabilities are not near-ties
    p = probabilities.astype(np.float32)
    expected = np.where(p.max(0) > 0.5, np.array(classes)[np.argmax(p, 0)], 0)
    decisive = (np.abs(p.max(0) - 0.5) > 2e-3) & ((p.min(0) < 0.5) | (np.abs(p[0] - p[1]) > 2e-3))
    assert decisive.mean() > 0.5 and np.array_equal(expected[decisive], seg[decisive])


def test_modality_auto_reads_a_ct_reference_as_ct_and_an_mr_reference_as_mr(world, tmp_path, capsys):
    """--modality auto (the default): a reference holding air in Hounsfield units makes the run CT, exactly as
    --modality CT; an MR reference leaves it per-image ("other")."""
    folder = tmp_path / "ct"
    (folder / "q").mkdir(parents=True)
    for name, seed in (("ref", 3), ("q/ctq_0000", 4)):
        image, label = blob_volume((26, 30, 30), np.random.default_rng(seed), "CT", 3)
        write_volume(image, SPACING, str(folder / f"{name}.nii.gz"))
        write_volume(np.array([0, *VALUES], dtype=np.uint16)[label], SPACING, str(folder / f"{name}_seg.nii.gz"))
    os.remove(folder / "q" / "ctq_0000_seg.nii.gz")
    reference = f"{folder / 'ref.nii.gz'}:{folder / 'ref_seg.nii.gz'}"
    probabilities = {}
    for modality in ("auto", "CT", "other"):
        flag = [] if modality == "auto" else ["--modality", modality]
        run(world, "-i", str(folder / "q"), "-o", str(tmp_path / modality), "-r", reference, "--save_probabilities",
            *flag)
        probabilities[modality] = np.load(tmp_path / modality / "ctq.npz")["probabilities"]
        printed = capsys.readouterr().out
        assert ("modality CT: " in printed and "holds air in Hounsfield units" in printed) == (modality == "auto")
    np.testing.assert_array_equal(probabilities["auto"], probabilities["CT"])
    assert np.abs(probabilities["auto"].astype(np.float32) - probabilities["other"]).max() > 0.05
    run(world, "-i", str(world["queries"] / "caseA_0000.nii.gz"), "-o", str(tmp_path / "mr"), "-r", world["ref"][0])
    assert "modality other (MR-like" in capsys.readouterr().out


def test_dicom_series_query_and_raw_folder_reference(world, tmp_path):
    image, _ = read(world["queries"] / "caseA_0000.nii.gz")
    source = sitk.ReadImage(str(world["queries"] / "caseA_0000.nii.gz"))
    series = tmp_path / "dicom" / "patient7"
    series.mkdir(parents=True)
    volume = sitk.Cast(sitk.GetImageFromArray(np.round(image).astype(np.int16)), sitk.sitkInt16)
    volume.CopyInformation(source)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.GetDepth()):
        slice_ = volume[:, :, z]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.3.4"), ("0020|000e", "1.2.3.4.5"),
                           ("0020|0013", str(z + 1)), ("0018|0050", str(volume.GetSpacing()[2])),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))))):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(slice_)
    raw = tmp_path / "Dataset009_Refs"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(2):
        os.link(world["refs"] / f"ref{i}.nii.gz", raw / "imagesTr" / f"r{i}_0000.nii.gz")
        os.link(world["refs"] / f"ref{i}_seg.nii.gz", raw / "labelsTr" / f"r{i}.nii.gz")
    out = tmp_path / "out"
    run(world, "-i", str(tmp_path / "dicom"), "-o", str(out), "-r", str(raw))
    seg, seg_image = read(out / "patient7.nii.gz")
    assert seg_image.GetSize() == source.GetSize()
    np.testing.assert_allclose(seg_image.GetSpacing(), source.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(seg_image.GetOrigin(), source.GetOrigin(), atol=1e-3)
    assert set(np.unique(seg).tolist()) <= {0, *VALUES}
    # the same scan as NIfTI (before rounding to int16) gets nearly the same, non-empty segmentation
    run(world, "-i", str(world["queries"] / "caseA_0000.nii.gz"), "-o", str(tmp_path / "nifti"), "-r", str(raw))
    from_nifti = read(tmp_path / "nifti" / "caseA.nii.gz")[0]
    assert (seg > 0).sum() > 100
    assert 2 * ((seg > 0) & (from_nifti > 0)).sum() / ((seg > 0).sum() + (from_nifti > 0).sum()) > 0.9


# ------------------------------------------------------------------------------------- strategies
def test_ensemble_of_two_identical_references_equals_oneshot(world, tmp_path):
    query = str(world["queries"] / "caseA_0000.nii.gz")
    # fusion off: with one reference auto fuses; with two it would register the second copy onto the first, find it
    # perfect and fuse
    run(world, "-i", query, "-o", str(tmp_path / "one"), "-r", world["ref"][0], "--strategy", "oneshot",
        "--save_probabilities", "--registration_fusion", "off")
    run(world, "-i", query, "-o", str(tmp_path / "two"), "-r", world["ref"][0], world["ref"][0],
        "--save_probabilities", "--registration_fusion", "off")
    np.testing.assert_array_equal(read(tmp_path / "one" / "caseA.nii.gz")[0],
                                  read(tmp_path / "two" / "caseA.nii.gz")[0])
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "caseA.npz")["probabilities"],
                                  np.load(tmp_path / "two" / "caseA.npz")["probabilities"])


def test_precision_picks_the_windows_arithmetic_and_auto_says_which(world, tmp_path, capsys, monkeypatch):
    """auto is bfloat16 where the CPU has AMX (here pretended, so the test runs on any CPU) and says so; the explicit
    choices are what they say."""
    monkeypatch.setattr(segmenter, "cpu_has_native_bfloat16", lambda: True)
    query = str(world["queries"] / "caseA_0000.nii.gz")
    maps = {}
    for precision in ("auto", "bfloat16", "float32"):
        capsys.readouterr()
        run(world, "-i", query, "-o", str(tmp_path / precision), "-r", world["ref"][0], "--save_probabilities",
            "--threshold", "0.5", "-step_size", "0.5", "--precision", precision)
        said = "windows in bfloat16" in capsys.readouterr().out
        assert said == (precision == "auto"), precision
        maps[precision] = np.load(tmp_path / precision / "caseA.npz")["probabilities"].astype(np.float32)
    np.testing.assert_array_equal(maps["auto"], maps["bfloat16"])
    assert not np.array_equal(maps["bfloat16"], maps["float32"])
    assert np.abs(maps["bfloat16"] - maps["float32"]).mean() < 0.01


def test_no_position_prior_segments_from_the_image_alone(world, tmp_path, predictor):
    """--no_position_prior gives the probabilities of the task without positions; with them the maps differ, and
    most where the references hold no structure (the prior pulls the logits down there)."""
    query = str(world["queries"] / "caseA_0000.nii.gz")
    run(world, "-i", query, "-o", str(tmp_path / "with"), "-r", world["ref"][0], "--save_probabilities")
    run(world, "-i", query, "-o", str(tmp_path / "without"), "-r", world["ref"][0], "--save_probabilities",
        "--no_position_prior")
    with_prior = np.load(tmp_path / "with" / "caseA.npz")["probabilities"].astype(np.float32)
    without = np.load(tmp_path / "without" / "caseA.npz")["probabilities"].astype(np.float32)
    task = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool.mean()
    assert task.positions is not None
    bare = predictor.predict_case([query], dataclasses.replace(task, positions=None), save_probabilities=True)
    np.testing.assert_array_equal(bare.probabilities.astype(np.float32), without)
    assert np.abs(with_prior - without).max() > 0.05
    assert (with_prior <= without + 1e-3).mean() > 0.95  # the prior only lowers (its peak is log(1 + floor) ~ 0)


def test_ensemble_of_different_references_differs_and_handles_partial_classes(world, tmp_path, predictor):
    # reference 3 holds only class 53: the ensemble averages 53 over refs 0 and 3, the others come from ref 0
    make_case(tmp_path / "partial.nii.gz", tmp_path / "partial_seg.nii.gz", seed=30, values=(53,))
    partial = f"{tmp_path}/partial.nii.gz:{tmp_path}/partial_seg.nii.gz"
    refs = parse_reference(world["ref"][0], 1) + parse_reference(partial, 1)
    encoded = predictor.encode_references(refs)
    assert encoded.pool.classes == list(VALUES) and encoded.pool.present.tolist() == [[True, True, True],
                                                                                       [False, True, False]]
    one = predictor.encode_references(refs[:1]).pool.mean()
    both = encoded.pool.mean()
    for a, b in zip(one.tokens, both.tokens):
        torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]])
        assert not torch.allclose(a[:, 1], b[:, 1])
    query = [str(world["queries"] / "caseA_0000.nii.gz")]
    r1 = predictor.predict_case(query, one, save_probabilities=True)
    r2 = predictor.predict_case(query, both, save_probabilities=True)
    assert not np.array_equal(r1.probabilities[1], r2.probabilities[1])


def test_task_file_reuse_gives_identical_output(world, tmp_path, capsys):
    query = str(world["queries"] / "scanB.mha")
    task = tmp_path / "task.pt"
    run(world, "-i", query, "-o", str(tmp_path / "a"), "-r", *world["ref"][:2], "--save_task", str(task))
    run(world, "-i", query, "-o", str(tmp_path / "b"), "--task", str(task))
    np.testing.assert_array_equal(read(tmp_path / "a" / "scanB.mha")[0], read(tmp_path / "b" / "scanB.mha")[0])
    # encoding only (no queries), then a class subset from the task file
    only = tmp_path / "only.pt"
    run(world, "-r", *world["ref"][:2], "--save_task", str(only))
    assert only.is_file() and "task written" in capsys.readouterr().out
    run(world, "-i", query, "-o", str(tmp_path / "c"), "--task", str(only), "--classes", "53")
    assert set(np.unique(read(tmp_path / "c" / "scanB.mha")[0]).tolist()) <= {0, 53}


def test_retrieval_selects_the_most_similar_reference():
    g = torch.Generator().manual_seed(0)
    pool = TaskEmbedding([torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 4, generator=g)], [17, 53],
                         torch.tensor([[True, True], [True, True], [True, False]]), "m")
    # the query's own structure 17 looks like reference 2, its 53 like reference 0
    query = TaskEmbedding([torch.stack([pool.tokens[i][2 - 2 * k, k] + 0.01 for k in range(2)])[None]
                           for i in range(2)], [17, 53], torch.ones(1, 2, dtype=torch.bool), "m")
    task, picks = select_references(pool, query)
    assert picks == {17: [2], 53: [0]}
    for t, p in zip(task.tokens, pool.tokens):
        torch.testing.assert_close(t[0, 0], p[2, 0])
        torch.testing.assert_close(t[0, 1], p[0, 1])
    _, picks = select_references(pool, query, top_k=2)
    assert picks[53] == [0, 1]  # reference 2 lacks class 53: never a candidate
    # a class the query did not predict keeps every reference holding it
    _, picks = select_references(pool, query.select([53]))
    assert picks == {53: [0]}


def test_retrieval_end_to_end(world, tmp_path, predictor, capsys):
    refs = [c for spec in world["ref"] for c in parse_reference(spec, 1)]
    pool = predictor.encode_references(refs).pool
    query = [str(world["queries"] / "caseA_0000.nii.gz")]
    result = predictor.predict_case(query, pool.mean(), pool=pool)
    assert set(result.retrieved) <= set(VALUES) and result.retrieved
    assert all(len(v) == 1 for v in result.retrieved.values())
    # the output is the segmentation with the picked references
    keep = torch.zeros_like(pool.present)
    for k, value in enumerate(pool.classes):
        keep[result.retrieved.get(value, [b for b in range(3) if pool.present[b, k]]), k] = True
    chosen = TaskEmbedding(pool.tokens, pool.classes, keep, pool.model_id, pool.positions).mean()
    np.testing.assert_array_equal(result.segmentation, predictor.predict_case(query, chosen).segmentation)
    # CLI: the picks are reported by reference name, --retrieval_top_k of them per class
    run(world, "-i", query[0], "-o", str(tmp_path / "r"), "-r", *world["ref"], "--strategy", "retrieval",
        "--retrieval_top_k", "2", "-f", "0", "-chk", "checkpoint_best.pth", "-device", "cpu")
    picked = capsys.readouterr().err.split("retrieval picked, per class, ")[1].splitlines()[0]
    assert all(len(part.split(":")[1].split(",")) == 2 and "ref" in part for part in picked.split(";"))
    assert (tmp_path / "r" / "caseA.nii.gz").is_file()


def test_tune_changes_the_embedding_and_lowers_the_reference_loss(world, tmp_path, predictor):
    refs = [c for spec in world["ref"][:2] for c in parse_reference(spec, 1)]
    encoded = predictor.encode_references(refs)
    task, losses = predictor.task_for_strategy(encoded.pool, "tune", encoded, tune_steps=3, tune_lr=0.05)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(task.tokens, encoded.pool.mean().tokens))
    assert all(p.requires_grad for p in predictor.network.parameters())  # unfrozen afterwards
    # CLI: the tuned task is what --save_task writes; reusing it gives the same output
    query = str(world["queries"] / "caseA_0000.nii.gz")
    run(world, "-i", query, "-o", str(tmp_path / "t"), "-r", world["ref"][0], "--strategy", "tune",
        "--tune_steps", "1", "--tune_lr", "0.05", "--save_task", str(tmp_path / "tuned.pt"),
        "--registration_fusion", "off")  # a task file segments by the network alone
    run(world, "-i", query, "-o", str(tmp_path / "u"), "--task", str(tmp_path / "tuned.pt"))
    np.testing.assert_array_equal(read(tmp_path / "t" / "caseA.nii.gz")[0], read(tmp_path / "u" / "caseA.nii.gz")[0])


def test_many_classes_in_several_passes(world, tmp_path, predictor):
    values = (3, 9, 40, 41, 300)
    label = make_case(tmp_path / "r.nii.gz", tmp_path / "r_seg.nii.gz", seed=40, values=values)
    refs = parse_reference(f"{tmp_path}/r.nii.gz:{tmp_path}/r_seg.nii.gz", 1)
    pool = predictor.encode_references(refs).pool
    assert pool.classes == sorted(set(np.unique(label).tolist()) - {0}) and pool.num_classes >= 4
    assert predictor.classes_in_one_pass((40, 40, 40)) >= 5  # one pass by default
    tight = IrisPredictor(use_mirroring=False, map_memory_gb=2 * 40**3 * 2 / 1024**3)
    tight.initialize_from_model_folder(world["model"])
    assert tight.classes_in_one_pass((40, 40, 40)) == 2
    query = [str(world["queries"] / "caseA_0000.nii.gz")]
    result = tight.predict_case(query, pool.mean(), save_probabilities=True)
    assert set(np.unique(result.segmentation).tolist()) <= {0, *values}
    assert result.probabilities.shape[0] == pool.num_classes
    # the passes' maps are put together into one decision: each voxel gets the most probable class above 0.5
    highest = result.probabilities.max(0).astype(np.float32)
    assert (result.segmentation > 0).sum() > 100
    assert (result.segmentation[highest > 0.505] > 0).all() and (result.segmentation[highest < 0.495] == 0).all()
    best = np.array(pool.classes)[result.probabilities.argmax(0)]
    clear = highest > 0.505
    assert np.mean(result.segmentation[clear] == best[clear]) > 0.99  # float16 ties aside
    run(world, "-i", query[0], "-o", str(tmp_path / "o"), "-r", f"{tmp_path}/r.nii.gz:{tmp_path}/r_seg.nii.gz",
        "--classes_per_pass", "1", "-step_size", "1")
    assert set(np.unique(read(tmp_path / "o" / "caseA.nii.gz")[0]).tolist()) <= {0, *values}


def test_array_and_simpleitk_api_give_the_file_output(world, tmp_path, predictor):
    """nnU-Net's in-memory entry points, with the task: exactly what iris_predict writes."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    # at the API's threshold (0.5; iris_predict's default calibrates one per class on the references) and every
    # component kept (the API's default; iris_predict's keeps the largest of the classes whose references gain)
    run(world, "-i", str(world["queries"]), "-o", str(tmp_path / "cli"), "-r", world["ref"][0], "--threshold", "0.5",
        "--postprocess", "none")
    task = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool
    expected, _ = read(tmp_path / "cli" / "scanB.mha")
    assert (expected > 0).sum() > 100
    data, properties = SimpleITKIO().read_images([str(world["queries"] / "scanB.mha")])
    kept = {k: v for k, v in properties.items()}
    segmentation, probabilities = predictor.predict_single_npy_array(data, properties, task, True)
    np.testing.assert_array_equal(segmentation, expected)
    assert probabilities.shape == (3, *expected.shape) and properties == kept  # the caller's dict is untouched
    image = sitk.ReadImage(str(world["queries"] / "scanB.mha"))
    labelled = predictor.predict_sitk(image, task)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelled), expected)
    assert labelled.GetSize() == image.GetSize() and labelled.GetDirection() == image.GetDirection()
    (listed,) = predictor.predict_from_list_of_npy_arrays([data], [properties], task)
    np.testing.assert_array_equal(listed, expected)
    assert predictor.predict_from_files(str(world["queries"]), str(tmp_path / "files"), task) == []
    for name in ("caseA.nii.gz", "scanB.mha"):
        np.testing.assert_array_equal(read(tmp_path / "files" / name)[0], read(tmp_path / "cli" / name)[0])
    with pytest.raises(IrisInputError, match=r"must be \(C=1, Z, Y, X\)"):
        predictor.predict_single_npy_array(data[0], properties, task)


def test_keep_largest_components_per_class():
    segmentation = np.zeros((10, 12, 14), dtype=np.uint16)
    segmentation[1:5, 1:5, 1:5] = 7  # class 7: a large part ...
    segmentation[7:9, 8:10, 10:12] = 7  # ... and a small one
    segmentation[1:3, 8:11, 9:13] = 300  # class 300: one part, touching nothing of class 7
    segmentation[6, 1, 1] = 300  # and a single stray voxel
    kept = keep_largest_components(segmentation, [7, 300, 5])  # 5: asked for, absent
    expected = segmentation.copy()
    expected[7:9, 8:10, 10:12] = 0
    expected[6, 1, 1] = 0
    np.testing.assert_array_equal(kept, expected)
    assert segmentation[6, 1, 1] == 300  # the input is left as it was


def test_postprocess_largest_component_end_to_end(world, tmp_path):
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    for out, extra in ((plain, ["--postprocess", "none"]), (kept, ["--postprocess", "largest_component"])):
        run(world, "-i", str(world["queries"]), "-o", str(out), "-r", world["ref"][0], *extra)
    removed = 0
    for name in ("caseA.nii.gz", "scanB.mha"):
        before, after = read(plain / name)[0], read(kept / name)[0]
        assert np.all((after == before) | (after == 0))  # only removes voxels
        for value in set(np.unique(before).tolist()) - {0}:
            parts, count = scipy.ndimage.label(before == value, structure=np.ones((3, 3, 3)))  # 26-connected
            assert scipy.ndimage.label(after == value, structure=np.ones((3, 3, 3)))[1] == 1
            assert (after == value).sum() == np.bincount(parts.ravel())[1:].max()
            removed += count - 1
    assert removed > 0  # the random model's output has stray parts to remove


def test_winner_over_class_chunks_is_the_best_class_above_its_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (7, 5, 6, 4)).astype(np.float32)
    winner = Winner(logits.shape[1:])
    for start in range(0, 7, 3):
        winner.update(logits[start:start + 3], start)
    expected = np.where(logits.max(0) > 0, logits.argmax(0) + 1, 0)
    np.testing.assert_array_equal(winner.index, expected)
    # one threshold per class: the most probable class, kept where it passes its own threshold, in passes as well
    thresholds = {v: t for v, t in zip(range(1, 8), (0.5, 0.1, 0.9, 0.3, 0.5, 0.02, 0.7))}
    floors = threshold_logits(thresholds, range(1, 8))
    winner = Winner(logits.shape[1:], floors)
    for start in range(0, 7, 3):
        winner.update(logits[start:start + 3], start)
    best = logits.argmax(0)
    expected = np.where(logits.max(0) > floors[best], best + 1, 0)
    assert 0 < (expected != np.where(logits.max(0) > 0, best + 1, 0)).mean() < 0.5  # the thresholds matter here
    np.testing.assert_array_equal(winner.index, expected)
    # chunks laid out class-last (as the export resamples them) and fp16 tensors (as the windows sum them) alike
    class_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(logits, 0, -1)), -1, 0)
    halves = torch.from_numpy(logits).half()
    rounded = halves.float().numpy()
    for chunks, values in (((class_last[:4], class_last[4:]), logits), ((halves[:4], halves[4:]), rounded)):
        winner = Winner(logits.shape[1:], floors)
        winner.update(chunks[0], 0)
        winner.update(chunks[1], 4)
        best = values.argmax(0)
        np.testing.assert_array_equal(winner.index, np.where(values.max(0) > floors[best], best + 1, 0))
    # equal logits: the first class keeps the voxel, within a chunk and across chunks
    winner = Winner((2, 2, 2))
    winner.update(np.ones((1, 2, 2, 2), np.float32), 0)
    winner.update(np.ones((3, 2, 2, 2), np.float32), 1)
    assert (winner.index == 1).all()
    winner.update(np.full((2, 2, 2, 2), 2, np.float32), 4)
    assert (winner.index == 5).all()


def test_export_resampling_equals_nnunets():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from iris_nnu.inference.export import resample_to_cropped_shape

    manager = PlansManager(tiny_plans()[0])
    configuration = manager.get_configuration("3d_fullres")
    logits = torch.randn(3, 30, 32, 33, generator=torch.Generator().manual_seed(0)).half()
    # near-isotropic: the fast trilinear path; 5 mm slices: nnU-Net's separate-z path itself
    for spacing, shape in (((1.2, 1.0, 0.9), (25, 32, 37)), ((5.0, 1.0, 1.0), (6, 32, 33))):
        properties = {"spacing": list(spacing), "shape_after_cropping_and_before_resampling": shape}
        ours = resample_to_cropped_shape(logits, manager, configuration, properties)
        theirs = configuration.resampling_fn_probabilities(logits.float().numpy(), shape, configuration.spacing,
                                                           list(spacing))
        assert ours.shape == (3, *shape) and np.abs(ours - theirs).max() < 1e-4


def test_ct_modality_uses_the_ct_member_or_the_fixed_window():
    plans, _ = tiny_plans("CT")
    plans["iris"]["members"]["Dataset001_Synth"]["normalization_schemes"] = ["CTNormalization"]
    ct = inference_plans(plans, "CT", 1)
    assert ct["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert ct["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] == 400.0
    mr_plans, _ = tiny_plans("MR")
    fixed = inference_plans(mr_plans, "CT", 1)["foreground_intensity_properties_per_channel"]["0"]
    assert (fixed["percentile_00_5"], fixed["percentile_99_5"]) == (-990.0, 500.0)
    other = inference_plans(plans, "other", 1)["configurations"]["3d_fullres"]
    assert other["normalization_schemes"] == ["PercentileZScoreNormalization"]


def test_a_ct_records_the_box_of_its_body_and_an_mr_none(tmp_path):
    """RunPreprocessing of a CT gives the box where its windows run: the body (its regions above air, an arm held
    apart from the trunk with them, a strip of the couch small beside them left out) in the preprocessed grid, a few
    voxels wider. A CT reference's registration atlas holds that box and every labelled voxel, even one drawn into
    the air."""
    plans, _ = tiny_plans("CT")
    ct = np.full((40, 60, 50), -1000.0, np.float32)  # (Z, Y, X)
    ct[5:30, 10:40, 8:22] = 40.0  # the trunk
    ct[8:28, 14:34, 26:30] = 40.0  # an arm, apart from it
    ct[:, 55:57, 10:14] = 200.0  # a strip of the couch
    ct += np.random.default_rng(0).normal(0, 10, ct.shape).astype(np.float32)
    marked = np.zeros((1, *ct.shape), np.int16)  # where the body and the couch land after preprocessing
    marked[0, 5:30, 10:40, 8:22] = 1
    marked[0, 8:28, 14:34, 26:30] = 1
    marked[0, :, 55:57, 10:14] = 2
    properties = {"spacing": [2.0, 1.0, 1.0]}  # 2 mm slices, resampled to the plan's 1 mm
    _, seg, properties = RunPreprocessing(inference_plans(plans, "CT", 1))(ct[None], marked, properties)
    box = properties[BODY_BOX_KEY]
    body = [(int(np.flatnonzero(np.any(seg == 1, axis=tuple(a for a in range(3) if a != axis))).min()),
             int(np.flatnonzero(np.any(seg == 1, axis=tuple(a for a in range(3) if a != axis))).max()) + 1)
            for axis in range(3)]
    # around the body: the 2-voxel margin, and the 2-voxel stride of the search (2 mm slices: 4 voxels)
    for (lo, hi), (body_lo, body_hi) in zip(box, body):
        assert body_lo - 6 <= lo <= body_lo and body_hi <= hi <= body_hi + 6
    assert not (seg[tuple(slice(lo, hi) for lo, hi in box)] == 2).any()  # the couch is left out
    assert np.prod([hi - lo for lo, hi in box]) < 0.5 * seg.size
    mr, _ = blob_volume((26, 30, 30), np.random.default_rng(1), "MR", 2)
    _, _, properties = RunPreprocessing(inference_plans(plans, "other", 1))(mr[None], None, {"spacing": [1.0] * 3})
    assert BODY_BOX_KEY not in properties
    label = (marked[0] == 1).astype(np.uint8)
    label[12:16, 40:46, 12:20] = 1  # drawn 6 voxels into the air
    write_volume(ct, (1.0, 1.0, 2.0), str(tmp_path / "ct.nii.gz"))
    write_volume(label, (1.0, 1.0, 2.0), str(tmp_path / "ct_seg.nii.gz"))
    case = parse_reference(f"{tmp_path / 'ct.nii.gz'}:{tmp_path / 'ct_seg.nii.gz'}", 1)[0]
    atlas = prepare_reference(case, RunPreprocessing(inference_plans(plans, "CT", 1)), SimpleITKIO, (32,) * 3,
                              keep_atlas=True).atlas
    assert atlas.labels.sum() == label.sum()
    assert atlas.image.size < 0.5 * ct.size and atlas.image.shape == atlas.labels.shape


def test_modality_of_tells_a_ct_by_its_air():
    ct, _ = blob_volume((26, 30, 30), np.random.default_rng(1), "CT", 2)
    mr, _ = blob_volume((26, 30, 30), np.random.default_rng(1), "MR", 2)
    assert modality_of(ct) == "CT" and modality_of(mr) == "other"
    assert modality_of((mr - mr.mean()) / mr.std()) == "other"  # a z-scored MR goes below 0, nowhere near air
    assert modality_of(np.clip(ct, -100, None)) == "other"  # a CT cut to hold no air needs --modality CT


def test_ct_modality_end_to_end_and_far_spacing_warning(world, tmp_path, capsys):
    image, label = blob_volume((26, 30, 30), np.random.default_rng(50), "CT", 2)
    write_volume(image, (1.0, 1.0, 1.0), str(tmp_path / "ct.nii.gz"))
    write_volume(np.array([0, 5, 6], np.uint8)[label], (1.0, 1.0, 1.0), str(tmp_path / "ct_seg.nii.gz"))
    write_volume(image[::4], (1.0, 1.0, 4.0), str(tmp_path / "thick.nii.gz"))  # 4 mm slices vs the model's 1 mm
    write_volume(image / 1000 + 5, (1.0, 1.0, 1.0), str(tmp_path / "nothu.nii.gz"))  # not Hounsfield units
    queries = tmp_path / "q"
    queries.mkdir()
    for name in ("thick", "nothu"):
        os.replace(tmp_path / f"{name}.nii.gz", queries / f"{name}.nii.gz")
    write_volume(image, (1.0, 1.0, 1.0), str(queries / "same.nii.gz"))  # the reference scan itself, in HU
    # in HU but mostly air around the body, as a head-and-neck CT: the old check read its range below the window
    write_volume(np.pad(image, 25, constant_values=-1000.0), (1.0, 1.0, 1.0), str(queries / "air.nii.gz"))
    run(world, "-i", str(queries), "-o", str(tmp_path / "o"), "-r", f"{tmp_path}/ct.nii.gz:{tmp_path}/ct_seg.nii.gz",
        "--modality", "CT")
    err = capsys.readouterr().err
    assert "thick.nii.gz" in err and "far from the model's" in err
    assert "nothu.nii.gz" in err and "outside the model's CT window" in err
    assert "same.nii.gz" not in err
    assert not any("air.nii.gz" in line and "CT window" in line for line in err.splitlines())
    for name in ("thick", "nothu", "same", "air"):
        seg, seg_image = read(tmp_path / "o" / f"{name}.nii.gz")
        assert seg_image.GetSize() == sitk.ReadImage(str(queries / f"{name}.nii.gz")).GetSize()
        assert set(np.unique(seg).tolist()) <= {0, 5, 6}
    same, _ = read(tmp_path / "o" / "same.nii.gz")
    assert (same > 0).sum() > 100  # the CT path segments: a CT-normalised query gets foreground


def test_find_queries_groups_channels():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c.nii.gz", "notes.txt"):
            Path(d, name).write_bytes(b"")
        queries, problems = find_queries(d, 2)
        assert [(q.name, [Path(f).name for f in q.images]) for q in queries] == [
            ("a", ["a_0000.nii.gz", "a_0001.nii.gz"])]
        assert len(problems) == 2 and any("b_0000.nii.gz" in p for p in problems)
        queries, problems = find_queries(d, 1)
        assert [q.name for q in queries] == ["b", "c"] and "a_0000.nii.gz" in problems[0]
        Path(d, "c.mha").write_bytes(b"")  # two files, one case name
        queries, problems = find_queries(d, 1)
        assert [q.name for q in queries] == ["b", "c"] and any("case name c is also used" in p for p in problems)


# -------------------------------------------------------------------------------------- bad input
def test_reference_geometry_mismatch(world, tmp_path, capsys):
    make_case(tmp_path / "img.nii.gz", None, seed=1)
    make_case(tmp_path / "lab.nii.gz", None, seed=1, shape=(26, 30, 28))
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"),
                       "-r", f"{tmp_path}/img.nii.gz:{tmp_path}/lab.nii.gz")
    assert "img.nii.gz" in msg and "lab.nii.gz" in msg and "size" in msg
    make_case(tmp_path / "lab2.nii.gz", None, seed=1, spacing=(1.0, 1.0, 1.0))
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"),
                       "-r", f"{tmp_path}/img.nii.gz:{tmp_path}/lab2.nii.gz")
    assert "spacing/origin/direction differ" in msg
    assert not (tmp_path / "o").exists()  # nothing written


def test_empty_reference_label_and_absent_class(world, tmp_path, capsys):
    make_case(tmp_path / "img.nii.gz", None, seed=1)
    write_volume(np.zeros((26, 30, 30), np.uint8), SPACING, str(tmp_path / "empty.nii.gz"), origin=(3.0, -4.0, 5.0))
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"),
                       "-r", f"{tmp_path}/img.nii.gz:{tmp_path}/empty.nii.gz")
    assert "empty.nii.gz" in msg and "empty reference label" in msg
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"), "-r", world["ref"][0],
                       "--classes", "17", "99")
    assert "--classes 99" in msg and "17 53 2035" in msg
    msg = expect_error(capsys, world, "-r", world["ref"][0], "--classes", "0", "--save_task", str(tmp_path / "t.pt"))
    assert "0 is background" in msg


def test_missing_corrupt_and_unreadable_references(world, tmp_path, capsys):
    o = ["-i", str(world["queries"]), "-o", str(tmp_path / "o")]
    msg = expect_error(capsys, world, *o, "-r", f"{tmp_path}/nope.nii.gz:{world['refs']}/ref0_seg.nii.gz")
    assert "nope.nii.gz: file not found" in msg
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image at all")
    msg = expect_error(capsys, world, *o, "-r", f"{world['refs']}/ref0.nii.gz:{tmp_path}/bad.nii.gz")
    assert "bad.nii.gz: unreadable image" in msg
    msg = expect_error(capsys, world, *o, "-r", str(world["refs"] / "ref0.nii.gz"))
    assert "IMAGE:LABEL" in msg
    msg = expect_error(capsys, world, *o, "-r", str(tmp_path))
    assert "imagesTr" in msg


def test_bad_queries_are_reported_and_good_ones_still_segmented(world, tmp_path, capsys):
    queries = tmp_path / "q"
    queries.mkdir()
    make_case(queries / "good.nii.gz", None, seed=3)
    (queries / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    write_volume(np.ones((36, 40), np.float32), (1.0, 1.0), str(queries / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 8, 8, 8), np.float32), isVector=False),
                    str(queries / "fourd.nii.gz"))
    out = tmp_path / "out"
    msg = expect_error(capsys, world, "-i", str(queries), "-o", str(out), "-r", world["ref"][0])
    assert "3 of 4 queries failed" in msg
    assert "corrupt.nii.gz: unreadable image" in msg
    assert "flat.nii.gz: 2D image" in msg and "fourd.nii.gz: 4D image" in msg
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]  # nothing half-written
    msg = expect_error(capsys, world, "-i", str(tmp_path / "missing"), "-o", str(out), "-r", world["ref"][0])
    assert "missing: input not found" in msg
    before = (queries / "good.nii.gz").read_bytes()
    msg = expect_error(capsys, world, "-i", str(queries / "good.nii.gz"), "-o", str(queries), "-r", world["ref"][0])
    assert "good.nii.gz: its output would overwrite it" in msg and (queries / "good.nii.gz").read_bytes() == before


def test_background_workers_give_the_same_outputs(world, tmp_path, capsys):
    """-npp (preprocessing processes) and -nps (writing threads) change when work is done, not what is written;
    a bad query is still reported by name, from a worker process too."""
    queries = tmp_path / "q"
    queries.mkdir()
    for name in ("caseA_0000.nii.gz", "scanB.mha"):
        (queries / name).write_bytes((world["queries"] / name).read_bytes())
    (queries / "bad_0000.nii.gz").write_bytes(b"not an image")
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        msg = expect_error(capsys, world, "-i", str(queries), "-o", str(out), "-r", world["ref"][0],
                           "--save_probabilities", "-npp", workers, "-nps", workers)
        assert "1 of 3 queries failed" in msg and "bad_0000.nii.gz: unreadable image" in msg
        outputs[workers] = {p.name: p for p in out.iterdir()}
    assert sorted(outputs["0"]) == sorted(outputs["2"]) == ["caseA.nii.gz", "caseA.npz", "caseA.pkl", "scanB.mha",
                                                            "scanB.npz", "scanB.pkl"]
    for name in ("caseA.nii.gz", "scanB.mha"):
        np.testing.assert_array_equal(read(outputs["0"][name])[0], read(outputs["2"][name])[0])
        np.testing.assert_array_equal(np.load(outputs["0"][name.split(".")[0] + ".npz"])["probabilities"],
                                      np.load(outputs["2"][name.split(".")[0] + ".npz"])["probabilities"])
    assert "-npp and -nps must be >= 0" in expect_error(capsys, world, "-i", str(queries), "-o", str(tmp_path / "o"),
                                                        "-r", world["ref"][0], "-npp", "-1")


def test_task_file_from_another_model_or_not_a_task(world, tmp_path, capsys):
    other = build_model_folder(tmp_path / "other", seed=1)
    main(["-m", str(other), "-r", world["ref"][0], "--save_task", str(tmp_path / "other.pt")])
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"),
                       "--task", str(tmp_path / "other.pt"))
    assert "other.pt: task file from another model" in msg
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "junk.pt: not a task file" in expect_error(capsys, world, "-i", str(world["queries"]), "-o",
                                                      str(tmp_path / "o"), "--task", str(tmp_path / "junk.pt"))
    assert "task file not found" in expect_error(capsys, world, "-i", str(world["queries"]), "-o",
                                                 str(tmp_path / "o"), "--task", str(tmp_path / "none.pt"))
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"),
                       "--task", str(tmp_path / "other.pt"), "--strategy", "tune")
    assert "tune" in msg and "-r" in msg
    assert not (tmp_path / "o").exists()


def test_model_folder_problems(world, tmp_path, capsys, monkeypatch):
    io = ["-i", str(world["queries"]), "-o", str(tmp_path / "o"), "-r", world["ref"][0]]
    monkeypatch.setattr("iris_nnu.io.model_folder.DEFAULT_MODEL_FOLDER", str(tmp_path / "no_bundled_model"))
    msg = expect_error(capsys, world, *io, model=False)
    assert "bundled default model has no fold_0/checkpoint_final.pth" in msg and "-m" in msg
    monkeypatch.undo()
    msg = expect_error(capsys, world, *io, "-f", "3")
    assert "fold_3" in msg and "fold_0" in msg
    msg = expect_error(capsys, world, *io, "-chk", "checkpoint_latest.pth")
    assert "checkpoint_latest.pth: not found" in msg and "checkpoint_best.pth, checkpoint_final.pth" in msg
    assert "model folder not found" in expect_error(capsys, world, *io, "-m", str(tmp_path / "nomodel"))


def test_parts_and_continue_prediction(world, tmp_path, capsys):
    """-num_parts/-part_id split the queries between processes; --continue_prediction skips finished ones."""
    out = tmp_path / "out"
    io = ["-i", str(world["queries"]), "-o", str(out), "-r", world["ref"][0]]
    run(world, *io, "-num_parts", "2", "-part_id", "1")
    assert sorted(p.name for p in out.iterdir()) == ["scanB.mha"]  # sorted names caseA, scanB: part 1 is scanB
    run(world, *io, "-num_parts", "2", "-part_id", "0")
    assert sorted(p.name for p in out.iterdir()) == ["caseA.nii.gz", "scanB.mha"]
    finished = out / "scanB.mha"
    finished.write_bytes(b"left as it is")  # stands for a finished output: it must not be rewritten
    (out / "caseA.nii.gz").unlink()  # an interrupted run: caseA missing
    capsys.readouterr()
    run(world, *io, "--continue_prediction")
    assert "1 queries already segmented" in capsys.readouterr().out
    assert finished.read_bytes() == b"left as it is"
    assert read(out / "caseA.nii.gz")[0].shape == read(world["queries"] / "caseA_0000.nii.gz")[0].shape


def test_fold_ensemble_is_the_mean_of_the_folds_probabilities(world, tmp_path, capsys):
    """-f 0 1: each fold encodes the references; the probabilities are the mean of the two folds' sigmoid maps."""
    model = tmp_path / "model"
    build_model_folder(model, seed=5, fold=0)
    build_model_folder(model, seed=3, fold=1)
    query = tmp_path / "q"
    query.mkdir()
    make_case(query / "one_0000.nii.gz", None, seed=20, spacing=(1.0, 1.0, 1.0))  # the model's spacing: no resampling
    maps = {}
    for folds in (["0"], ["1"], ["0", "1"], ["all"]):
        out = tmp_path / "_".join(folds)
        main(["-m", str(model), "-i", str(query), "-o", str(out), "-r", *world["ref"][:2], "--disable_tta",
              "-f", *folds, "--save_probabilities", "--threshold", "0.5",  # the labels checked at 0.5 below
              "--postprocess", "none", "--registration_fusion", "off"])
        maps[" ".join(folds)] = np.load(out / "one.npz")["probabilities"].astype(np.float32), read(out / "one.nii.gz")[0]
    assert "by each of 2 folds" in capsys.readouterr().out
    (p0, s0), (p1, s1), (both, seg) = maps["0"], maps["1"], maps["0 1"]
    assert (s0 > 0).sum() > 100 and (s1 > 0).sum() > 100 and np.abs(p0 - p1).mean() > 0.05  # two different models
    np.testing.assert_allclose(both, (p0 + p1) / 2, atol=2e-3)
    np.testing.assert_array_equal(maps["all"][0], both)
    mean = (p0 + p1) / 2
    expected = np.where(mean.max(0) > 0.5, np.array(VALUES)[np.argmax(mean, 0)], 0)
    top2 = np.sort(mean, 0)[-2:]
    decisive = (np.abs(top2[1] - 0.5) > 5e-3) & ((top2[0] < 0.5) | (top2[1] - top2[0] > 5e-3))
    assert decisive.mean() > 0.9 and np.array_equal(expected[decisive], seg[decisive])
    for strategy in ("retrieval", "tune"):  # each fold picks / tunes with its own embeddings
        out = tmp_path / strategy
        main(["-m", str(model), "-i", str(query), "-o", str(out), "-r", *world["ref"][:2], "--disable_tta",
              "-f", "0", "1", "--strategy", strategy, "--tune_steps", "2", "--registration_fusion", "off"])
        assert (read(out / "one.nii.gz")[0] > 0).sum() > 100
    for extra in (["--save_task", str(tmp_path / "t.pt")], ["--task", str(tmp_path / "t.pt")]):
        args = ["-m", str(model), "--disable_tta", "-f", "0", "1", "-i", str(query), "-o", str(tmp_path / "o")]
        msg = cli_error(capsys, main, "iris_predict", [*args, *([] if "--task" in extra else ["-r", world["ref"][0]]),
                                                     *extra])
        assert "a task file holds one fold's embedding" in msg


def flip_file(source: Path, target: Path, axis: int) -> None:
    """The image's voxels mirrored on array axis `axis`, same geometry."""
    image = sitk.ReadImage(str(source))
    flipped = sitk.GetImageFromArray(np.flip(sitk.GetArrayFromImage(image), axis).copy())
    flipped.CopyInformation(image)
    sitk.WriteImage(flipped, str(target))


def test_mirrored_tta_flips_the_references_with_the_query(world, predictor):
    """Each TTA flip of a window is segmented with the tokens of the reference crops flipped the same way."""
    tta = IrisPredictor(use_mirroring=True, precision="float32")  # compared with float32 calls of the network
    tta.initialize_from_model_folder(world["model"])
    refs = parse_reference(world["ref"][0], 1)
    task = tta.encode_references(refs).pool.mean()
    assert sorted(task.mirrored) == [(0,), (0, 1), (0, 1, 2), (0, 2), (1,), (1, 2), (2,)]
    assert predictor.encode_references(refs).pool.mirrored is None  # without TTA nothing extra is encoded
    encoded = predictor.encode_references(refs)
    flipped_crops = [dataclasses.replace(c, image=np.flip(c.image, (1, 3)).copy(), labels=np.flip(c.labels, (0, 2)).copy())
                     for c in encoded.crops[0]]
    expected = predictor.encode_crops(flipped_crops, encoded.classes)
    for a, b in zip(task.flipped((0, 2)).tokens, expected.tokens):
        torch.testing.assert_close(a, b)
    image = torch.randn(1, 32, 32, 32)  # one window: the sliding window returns its logits (fp16)
    frame = ScanFrame.box((40, 40, 40))
    coordinates = frame.coordinates((0, 0, 0), (32, 32, 32))[None]
    network = tta.network
    with torch.no_grad():
        total, query_only = network(image[None], task, coordinates), network(image[None], task, coordinates)
        for axes in task.mirrored:
            dims = [a + 2 for a in axes]
            total += network(image[None].flip(dims), task.flipped(axes), coordinates.flip(dims)).flip(dims)
            query_only += network(image[None].flip(dims), task, coordinates.flip(dims)).flip(dims)
    got = tta.segmenter().logits(image, [task], frame)[None].float()
    inside = (slice(None), slice(None), *(slice(4, 28),) * 3)  # fp16 Gaussian weights vanish at a lone window's rim
    torch.testing.assert_close(got[inside], (total / 8).clamp(-16, 16)[inside], atol=2e-2, rtol=2e-3)
    assert (got[inside] - (query_only / 8).clamp(-16, 16)[inside]).abs().mean() > 0.1  # flipping the query alone is another thing


def test_mirrored_tta_makes_the_segmentation_follow_a_mirrored_scan(world, tmp_path):
    """Query and reference mirrored left-right: with TTA the segmentation is the mirror of the unmirrored one (the
    flips form a group); a single pass of the random-weight model is far from that."""
    (tmp_path / "q").mkdir()
    flip_file(world["queries"] / "caseA_0000.nii.gz", tmp_path / "q" / "caseA_0000.nii.gz", 2)
    for name in ("ref0.nii.gz", "ref0_seg.nii.gz"):
        flip_file(world["refs"] / name, tmp_path / name, 2)
    agreement = {}
    for extra in ([], ["--tta"]):
        segmentations = []
        for query, ref in ((world["queries"] / "caseA_0000.nii.gz", world["ref"][0]),
                           (tmp_path / "q", f"{tmp_path}/ref0.nii.gz:{tmp_path}/ref0_seg.nii.gz")):
            out = tmp_path / f"out{len(segmentations)}{''.join(extra)}"
            main(["-m", world["model"], "-i", str(query), "-o", str(out), "-r", ref, *extra,
                  "--registration_fusion", "off"])
            segmentations.append(read(out / "caseA.nii.gz")[0])
        a, b = segmentations[0], np.flip(segmentations[1], 2)
        agreement[" ".join(extra)] = [2 * ((a == v) & (b == v)).sum() / max(1, (a == v).sum() + (b == v).sum())
                                      for v in VALUES]
    assert min(agreement["--tta"]) > 0.9, agreement  # measured 0.94-0.96 (crop centres round differently)
    assert np.mean(agreement[""]) < np.mean(agreement["--tta"]) - 0.3, agreement  # measured 0.29 mean


def test_tta_task_files_and_problems(world, tmp_path, capsys):
    """--save_task with --tta keeps the flipped references' tokens: the task file segments as the references do."""
    query = world["queries"] / "caseA_0000.nii.gz"
    main(["-m", world["model"], "-i", str(query), "-o", str(tmp_path / "r"), "-r", world["ref"][0], "--tta",
          "--save_task", str(tmp_path / "tta.pt"), "--registration_fusion", "off"])
    main(["-m", world["model"], "-i", str(query), "-o", str(tmp_path / "t"), "--task", str(tmp_path / "tta.pt"),
          "--tta"])
    np.testing.assert_array_equal(read(tmp_path / "r" / "caseA.nii.gz")[0], read(tmp_path / "t" / "caseA.nii.gz")[0])
    run(world, "-r", world["ref"][0], "--save_task", str(tmp_path / "plain.pt"))
    io = ["-i", str(query), "-o", str(tmp_path / "o")]
    msg = cli_error(capsys, main, "iris_predict", ["-m", world["model"], *io, "--task", str(tmp_path / "plain.pt"),
                                                   "--tta"])
    assert "plain.pt: the task file holds no mirrored embeddings" in msg
    msg = cli_error(capsys, main, "iris_predict", ["-m", world["model"], *io, "-r", world["ref"][0], "--tta",
                                                   "--strategy", "tune"])
    assert "--tta with --strategy tune" in msg
    assert cli_error(capsys, main, "iris_predict", ["-m", world["model"], *io, "-r", world["ref"][0], "--tta",
                                                    "--disable_tta"])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("-i", "-o", "-r", "--task", "-m", "-f", "-chk", "--classes", "--strategy", "--save_task",
                 "--tta", "--disable_tta", "-step_size", "-device", "--save_probabilities", "--modality", "--tune_steps",
                 "--tune_lr", "--retrieval_top_k", "--classes_per_pass", "-num_parts", "-part_id", "-npp", "-nps",
                 "--continue_prediction", "--overwrite", "--postprocess", "--precision"):
        assert f"  {flag} " in out or f"  {flag}\n" in out, flag


def test_option_problems(world, tmp_path, capsys):
    io = ["-i", str(world["queries"]), "-o", str(tmp_path / "o")]
    if not torch.cuda.is_available():
        assert "CUDA is not available" in expect_error(capsys, world, *io, "-r", world["ref"][0], "-device", "cuda")
    msg = expect_error(capsys, world, *io, "-r", *world["ref"][:2], "--strategy", "oneshot")
    assert "oneshot uses one reference, 2 given" in msg
    assert "-step_size" in expect_error(capsys, world, *io, "-r", world["ref"][0], "-step_size", "0.05")
    assert "nothing to do" in expect_error(capsys, world, "-r", world["ref"][0])
    assert "-part_id" in expect_error(capsys, world, *io, "-r", world["ref"][0], "-num_parts", "2", "-part_id", "2")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- inputs and existing outputs
def raw_layout(world, root: Path) -> Path:
    """An nnU-Net raw folder holding two labelled cases (ref0, ref1) of the world's references."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        (root / "imagesTr" / f"ref{i}_0000.nii.gz").write_bytes((world["refs"] / f"ref{i}.nii.gz").read_bytes())
        (root / "labelsTr" / f"ref{i}.nii.gz").write_bytes((world["refs"] / f"ref{i}_seg.nii.gz").read_bytes())
    return root


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_never_overwrite_inputs(world, tmp_path, capsys):
    raw = raw_layout(world, tmp_path / "raw")
    before = contents(raw)
    images, labels = raw / "imagesTr", raw / "labelsTr"
    ref = f"{images}/ref0_0000.nii.gz:{labels}/ref0.nii.gz"
    # issue 22: -i imagesTr -o labelsTr overwrote every ground-truth label, the reference's own included
    msg = expect_error(capsys, world, "-i", str(images), "-o", str(labels), "-r", ref, "--overwrite")
    assert f"{labels}/ref0.nii.gz: its output would overwrite it (a reference label)" in msg
    msg = expect_error(capsys, world, "-i", str(images), "-o", str(raw / "predicted"), "-r", str(raw))
    assert "inside reference folder" in msg and str(raw) in msg
    assert not (raw / "predicted").exists()  # the output folder made for the run is removed again
    # a reference scan named as the task file: refused even with --overwrite (issue 22: it was replaced)
    msg = expect_error(capsys, world, "-r", ref, "--save_task", f"{images}/ref0_0000.nii.gz", "--overwrite")
    assert "exists and is not a task file" in msg
    # labels that are not inputs are existing outputs: refused, named
    msg = expect_error(capsys, world, "-i", str(images), "-o", str(labels), "-r", world["ref"][2])
    assert "2 output file(s) exist: ref0.nii.gz, ref1.nii.gz" in msg and "--overwrite" in msg
    assert contents(raw) == before
    # the --task file as --save_task
    task = tmp_path / "task.pt"
    run(world, "-r", world["ref"][0], "--save_task", str(task))
    msg = expect_error(capsys, world, "--task", str(task), "--save_task", str(task), "--overwrite")
    assert "its output would overwrite it (the --task file)" in msg


def test_existing_outputs_are_replaced_only_with_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    io = ["-i", str(world["queries"]), "-o", str(out), "-r", world["ref"][0], "--save_probabilities"]
    run(world, *io)
    (out / "scanB.mha").write_bytes(b"an earlier result")
    before = contents(out)
    msg = expect_error(capsys, world, *io)
    assert "-o" in msg and "6 output file(s) exist: caseA.nii.gz, caseA.npz, caseA.pkl and 3 more" in msg
    assert contents(out) == before
    run(world, *io, "--overwrite")
    assert (out / "scanB.mha").read_bytes() != b"an earlier result" and read(out / "scanB.mha")[0].any()
    assert not leftovers(out)
    assert "not allowed with" in expect_error(capsys, world, *io, "--overwrite", "--continue_prediction")


def test_unwritable_output_and_save_task_problems(world, tmp_path, capsys, monkeypatch):
    def must_not_run(args):
        raise AssertionError("the model was loaded / the task encoded before the output was checked")

    monkeypatch.setattr("iris_nnu.inference.predict.run_prediction", must_not_run)
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", "/proc/iris_x", "-r", world["ref"][0])
    assert "-o /proc/iris_x: cannot create the output folder" in msg
    msg = expect_error(capsys, world, "-r", world["ref"][0], "--save_task", str(tmp_path))
    assert f"--save_task {tmp_path}: a folder" in msg
    monkeypatch.undo()
    task = tmp_path / "t.pt"
    run(world, "-r", world["ref"][0], "--save_task", str(task))
    first = task.read_bytes()
    msg = expect_error(capsys, world, "-r", world["ref"][1], "--save_task", str(task))
    assert "the task file exists (--overwrite replaces it)" in msg and task.read_bytes() == first
    run(world, "-r", world["ref"][1], "--save_task", str(task), "--overwrite")
    assert task.read_bytes() != first


def test_truncated_or_nan_nifti_queries_and_references_are_refused(world, tmp_path, capsys):
    # SimpleITK zero-fills a truncated .nii.gz and reads NaN in NIfTI as 0: a half query segmented with exit 0
    queries = tmp_path / "q"
    queries.mkdir()
    whole = (world["queries"] / "caseA_0000.nii.gz").read_bytes()
    (queries / "cut_0000.nii.gz").write_bytes(whole[:len(whole) // 2])
    out = tmp_path / "out"
    msg = expect_error(capsys, world, "-i", str(queries), "-o", str(out), "-r", world["ref"][0])
    assert f"1 of 1 queries failed: {queries}/cut_0000.nii.gz: truncated" in msg
    image = sitk.ReadImage(str(world["queries"] / "caseA_0000.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[5, 6, 7] = np.inf
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(image)
    sitk.WriteImage(nan, str(queries / "nan_0000.nii.gz"))
    (queries / "cut_0000.nii.gz").unlink()
    msg = expect_error(capsys, world, "-i", str(queries), "-o", str(out), "-r", world["ref"][0])
    assert "nan_0000.nii.gz: contains NaN or infinite values" in msg
    assert not out.exists() or not list(out.iterdir())
    # references: refused before the task is encoded, naming the file
    label = world["refs"] / "ref0_seg.nii.gz"
    (tmp_path / "cut_seg.nii.gz").write_bytes(label.read_bytes()[:200])
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(out), "-r",
                       f"{world['refs']}/ref0.nii.gz:{tmp_path}/cut_seg.nii.gz")
    assert f"{tmp_path}/cut_seg.nii.gz: truncated" in msg


def test_partial_outputs_of_a_killed_run_are_removed_when_the_next_starts(world, tmp_path):
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".caseA.partial{done.pid}.nii.gz"  # a killed run's, hidden (issue 22: never cleaned up)
    stale.write_bytes(b"half a segmentation")
    os.utime(stale, (1e9, 1e9))
    recent = out / f".scanB.partial{done.pid}.mha"  # changed just now: maybe another machine's, still writing
    recent.write_bytes(b"being written")
    live = out / f".scanB.partial{os.getppid()}.npz"  # a running process's
    live.write_bytes(b"being written")
    run(world, "-i", str(world["queries"] / "caseA_0000.nii.gz"), "-o", str(out), "-r", world["ref"][0])
    assert not stale.exists() and recent.exists() and live.exists() and (out / "caseA.nii.gz").is_file()


def test_a_nifti_sform_that_differs_from_the_qform_is_kept_in_the_output(world, tmp_path):
    import nibabel

    queries = tmp_path / "q"
    queries.mkdir()
    source = nibabel.load(str(world["queries"] / "caseA_0000.nii.gz"))
    qform = source.get_qform()
    sform = qform.copy()
    sform[:3, 3] += [10.0, 0.0, 0.0]  # 10 mm off the qform (issue 22: the output's sform was the qform)
    shifted = nibabel.Nifti1Image(np.asanyarray(source.dataobj), None, source.header.copy())
    shifted.set_qform(qform, 1)
    shifted.set_sform(sform, 2)
    nibabel.save(shifted, str(queries / "caseA_0000.nii.gz"))
    out = tmp_path / "out"
    run(world, "-i", str(queries), "-o", str(out), "-r", world["ref"][0])
    written = nibabel.load(str(out / "caseA.nii.gz"))
    np.testing.assert_allclose(written.header.get_sform(), sform, atol=1e-4)
    np.testing.assert_allclose(written.header.get_qform(), qform, atol=1e-4)
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    assert written.shape == shifted.shape and np.asanyarray(written.dataobj).any()
    # a query whose forms agree is written as before (SimpleITK's header, untouched)
    plain = tmp_path / "plain"
    run(world, "-i", str(world["queries"] / "caseA_0000.nii.gz"), "-o", str(plain), "-r", world["ref"][0])
    np.testing.assert_allclose(nibabel.load(str(plain / "caseA.nii.gz")).header.get_sform(), qform, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(nibabel.load(str(plain / "caseA.nii.gz")).dataobj),
                                  np.asanyarray(written.dataobj))


def test_label_values_of_2_to_the_32_are_refused_once_and_large_ones_read_exactly(world, tmp_path, capsys):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from iris_nnu.inference.images import read_label

    image = sitk.ReadImage(str(world["refs"] / "ref0_seg.nii.gz"))
    label = sitk.GetArrayFromImage(image).astype(np.uint64)
    label[label == VALUES[0]] = 2**32 + 5  # issue 22: accepted, then each query failed
    big = sitk.GetImageFromArray(label)
    big.CopyInformation(image)
    sitk.WriteImage(big, str(tmp_path / "big_seg.nrrd"))
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"), "-r",
                       f"{world['refs']}/ref0.nii.gz:{tmp_path}/big_seg.nrrd")
    assert f"{tmp_path}/big_seg.nrrd: label value 4294967301 is too large" in msg and "2**32" in msg
    assert not (tmp_path / "o").exists()
    # below 2**32 values are read in their own type: nnU-Net's float32 read_seg made 16777217 into 16777216
    label[label == 2**32 + 5] = 16777217
    exact = sitk.GetImageFromArray(label.astype(np.uint32))
    exact.CopyInformation(image)
    sitk.WriteImage(exact, str(tmp_path / "exact_seg.nii.gz"))
    assert 16777217 in read_label(str(tmp_path / "exact_seg.nii.gz"), SimpleITKIO())


def test_windows_drive_letters_split_at_the_right_colon():
    case = parse_reference(r"C:\data\img.nii.gz:C:\data\lbl.nii.gz", 1)[0]
    assert case.images == [r"C:\data\img.nii.gz"] and case.label == r"C:\data\lbl.nii.gz"
    case = parse_reference("D:/img.nii.gz:/posix/lbl.nii.gz", 1)[0]
    assert case.images == ["D:/img.nii.gz"] and case.label == "/posix/lbl.nii.gz"
    case = parse_reference("/a/img.nii.gz:rel/lbl.nii.gz", 1)[0]
    assert case.images == ["/a/img.nii.gz"] and case.label == "rel/lbl.nii.gz"
    with pytest.raises(IrisInputError, match="IMAGE:LABEL"):
        parse_reference(r"C:\data\img.nii.gz", 1)  # a drive letter alone is no pair


def test_a_task_file_with_nan_tokens_is_refused_at_load(world, tmp_path, capsys):
    # issue 22: it gave empty segmentations with exit 0
    task = tmp_path / "task.pt"
    run(world, "-r", world["ref"][0], "--save_task", str(task))
    state = torch.load(task, weights_only=True)
    state["tokens"][0][0, 0, 0, 0] = float("nan")
    torch.save(state, task)
    msg = expect_error(capsys, world, "-i", str(world["queries"]), "-o", str(tmp_path / "o"), "--task", str(task))
    assert f"{task}: not a task file" in msg and "NaN or infinite values" in msg
    assert not (tmp_path / "o").exists()


def test_a_run_follows_its_references_spacing_and_a_task_file_keeps_it(world, tmp_path, predictor):
    """The model's plan has the native spacing rule and a 1 mm finest spacing: references of 2 mm voxels are encoded
    and their queries segmented at 2 mm (not blown up to 1 mm), and the output is in each query's own geometry."""
    assert predictor.joint_plans["iris"]["spacing_rule"] == "native"
    make_case(tmp_path / "coarse.nii.gz", tmp_path / "coarse_seg.nii.gz", seed=10, shape=(14, 16, 16),
              spacing=(2.0, 2.0, 2.0))
    make_case(tmp_path / "query.nii.gz", None, seed=20, shape=(13, 15, 15), spacing=(2.1, 1.9, 2.0))
    task = predictor.encode_references(parse_reference(f"{tmp_path}/coarse.nii.gz:{tmp_path}/coarse_seg.nii.gz",
                                                       1)).pool.mean()
    assert task.spacing == 2.0 and predictor.configuration_manager.spacing == [2.0] * 3
    task.save(tmp_path / "task.pt")
    assert TaskEmbedding.load(tmp_path / "task.pt").spacing == 2.0
    fine = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool.mean()
    assert fine.spacing == 1.0 and predictor.spacing == 1.0
    result = predictor.predict_case([str(tmp_path / "query.nii.gz")], TaskEmbedding.load(tmp_path / "task.pt"))
    assert predictor.spacing == 2.0  # the task's, not the last references'
    assert result.segmentation.shape == (13, 15, 15)
    with pytest.raises(TaskMismatchError, match="spacings"):
        TaskEmbedding.concatenate([task, fine])


def permuted_copy(source: Path, target: Path, order: tuple[int, int, int], flip: int | None = None) -> None:
    """The same physical image stored with its axes in another order (and one axis reversed): voxels permuted,
    the direction and origin changed to match (SimpleITK's PermuteAxes / Flip keep the physical space)."""
    image = sitk.PermuteAxes(sitk.ReadImage(str(source)), order)
    if flip is not None:
        image = sitk.Flip(image, [a == flip for a in range(3)])
    sitk.WriteImage(image, str(target))


def test_a_result_does_not_depend_on_how_the_scans_are_stored(world, tmp_path, predictor):
    """Query and reference with their axes permuted and reversed: the segmentation, brought onto the original
    query's grid, is the original one, and each output keeps its own query's storage order and header. (A model
    planned before the voxel-order rule reads a run in its first reference's order: then only the query's storage
    does not matter.)"""
    query = world["queries"] / "caseA_0000.nii.gz"
    ref_image, ref_label = (Path(p) for p in world["ref"][0].split(":"))
    permuted_copy(query, tmp_path / "q_yxz.nii.gz", (1, 0, 2), flip=2)
    permuted_copy(ref_image, tmp_path / "r_zxy.nii.gz", (2, 0, 1), flip=0)
    permuted_copy(ref_label, tmp_path / "r_zxy_seg.nii.gz", (2, 0, 1), flip=0)
    original = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool.mean()
    expected = predictor.predict_case([str(query)], original).segmentation
    assert np.isin(VALUES, expected).sum() >= 2
    stored = predictor.encode_references(parse_reference(f"{tmp_path}/r_zxy.nii.gz:{tmp_path}/r_zxy_seg.nii.gz",
                                                         1)).pool.mean()
    assert stored.orientation == original.orientation == "LPS"  # the model's voxel order, whatever the storage
    for task in (original, stored):
        result = predictor.predict_case([str(tmp_path / "q_yxz.nii.gz")], task)
        out = label_to_sitk(result.segmentation, result.properties)
        query_image = sitk.ReadImage(str(tmp_path / "q_yxz.nii.gz"))
        assert out.GetSize() == query_image.GetSize() and out.GetDirection() == query_image.GetDirection()
        back = sitk.GetArrayFromImage(sitk.Resample(out, sitk.ReadImage(str(query)), sitk.Transform(),
                                                    sitk.sitkNearestNeighbor))
        agree = [2 * ((back == v) & (expected == v)).sum() / max((back == v).sum() + (expected == v).sum(), 1)
                 for v in VALUES if (expected == v).any()]
        assert min(agree) > 0.99, agree


def test_a_query_of_another_field_of_view_gets_a_warning(world, tmp_path, predictor):
    task = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool.mean()
    assert task.extent is not None and len(task.extent) == 3
    make_case(tmp_path / "wide.nii.gz", None, seed=30, shape=(26, 30, 90))  # its body 3x wider along x
    make_case(tmp_path / "like.nii.gz", None, seed=31, shape=(24, 32, 30))
    assert not any("field of view" in w for w in predictor.predict_case([str(tmp_path / "like.nii.gz")], task).warnings)
    warnings = predictor.predict_case([str(tmp_path / "wide.nii.gz")], task).warnings
    assert any("field of view" in w and "--no_position_prior" in w for w in warnings), warnings
    loaded = TaskEmbedding.load(task.save(tmp_path / "t.pt") or tmp_path / "t.pt")
    assert loaded.extent == pytest.approx(task.extent)


def oblique_copy(source: Path, target: Path, degrees: float) -> None:
    """The same physical scan on a grid turned by `degrees` about z through its centre (an oblique acquisition)."""
    image = sitk.ReadImage(str(source))
    turn = sitk.Euler3DTransform()
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    turn.SetCenter(centre)
    turn.SetRotation(0, 0, np.radians(degrees))
    direction = np.array(turn.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    grid = sitk.Image([int(s * 1.3) for s in image.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((np.array(centre) - direction @ (np.array([(s - 1) / 2 for s in grid.GetSize()])
                                                    * np.array(image.GetSpacing()))).tolist())
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0), str(target))


def test_an_oblique_query_is_segmented_on_an_axis_aligned_grid_and_written_on_its_own(world, tmp_path, predictor):
    """Quality on a real oblique scan: tests/test_default_model.py; here the mechanics."""
    from iris_nnu.orientation import aligned_direction, orientation_code

    oblique_copy(world["queries"] / "caseA_0000.nii.gz", tmp_path / "oblique.nii.gz", 30)
    task = predictor.encode_references(parse_reference(world["ref"][0], 1)).pool.mean()
    prepared = predictor.query_preparation([str(tmp_path / "oblique.nii.gz")])
    direction = prepared.properties["sitk_stuff"]["direction"]
    assert np.allclose(direction, aligned_direction(orientation_code(direction)))  # what the network sees
    result = predictor.predict_case([str(tmp_path / "oblique.nii.gz")], task)
    out = label_to_sitk(result.segmentation, result.properties)
    stored = sitk.ReadImage(str(tmp_path / "oblique.nii.gz"))
    assert out.GetSize() == stored.GetSize() and np.allclose(out.GetDirection(), stored.GetDirection())
    assert np.allclose(out.GetOrigin(), stored.GetOrigin()) and np.isin(VALUES, result.segmentation).any()
