"""iris_plan_and_preprocess: joint plan, preprocessing, collection registration, resumption and bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error, link_real_dataset
from synthetic import make_raw_dataset, write_volume

from iris_nnu.preprocessing.collection import load_collection
from iris_nnu.preprocessing.plan_and_preprocess import main
from iris_nnu.preprocessing.planner import MemberSummary, auto_target_spacing, plan_collection


def run_cli(*argv: str) -> None:
    main(list(argv))


def load_b2nd(path: Path) -> np.ndarray:
    import blosc2

    return blosc2.open(urlpath=str(path), mode="r")[:]


@pytest.fixture
def two_datasets(nnunet_env):
    raw = nnunet_env["nnUNet_raw"]
    # CT-like: anisotropic 0.8 x 0.8 x 2.5 mm; MR-like: 1 mm isotropic, different number of classes
    make_raw_dataset(str(raw), 11, "SynthCT", num_cases=6, shape_zyx=(12, 40, 40), spacing_xyz=(0.8, 0.8, 2.5),
                     modality="CT", num_classes=2, seed=1, prefix="ct")
    make_raw_dataset(str(raw), 12, "SynthMR", num_cases=7, shape_zyx=(28, 32, 32), spacing_xyz=(1.0, 1.0, 1.0),
                     modality="MR", num_classes=3, seed=2, prefix="mr")
    return nnunet_env


def test_joint_plan_two_modalities(two_datasets):
    pre = two_datasets["nnUNet_preprocessed"]
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--plan_for", "gpu")

    collection = load_collection(900)
    assert collection.name == "Dataset900_SynthCT_SynthMR"
    plans_ct = json.loads((pre / "Dataset011_SynthCT" / "IrisPlans.json").read_text())
    plans_mr = json.loads((pre / "Dataset012_SynthMR" / "IrisPlans.json").read_text())
    cfg_ct, cfg_mr = plans_ct["configurations"]["3d_fullres"], plans_mr["configurations"]["3d_fullres"]
    # the native spacing rule: each member at max(finest, its own native edge), the finest = the finest member's;
    # one patch and network for every member
    ct_edge = round((0.8 * 0.8 * 2.5) ** (1 / 3) / 0.05) * 0.05  # 1.17 -> 1.15 mm
    assert cfg_mr["spacing"] == collection.plans["configurations"]["3d_fullres"]["spacing"] == [1.0] * 3
    assert cfg_ct["spacing"] == pytest.approx([ct_edge] * 3)
    assert collection.plans["iris"]["spacing_rule"] == "native"
    spacing = cfg_ct["spacing"][0]
    assert cfg_ct["patch_size"] == cfg_mr["patch_size"]
    assert all(p % 16 == 0 for p in cfg_ct["patch_size"])
    assert cfg_ct["architecture"] == cfg_mr["architecture"]
    assert cfg_ct["architecture"]["network_class_name"] == "iris_nnu.model.network.IrisNetwork"
    # normalisation by modality
    assert cfg_ct["normalization_schemes"] == ["CTNormalization"]
    assert cfg_mr["normalization_schemes"] == ["PercentileZScoreNormalization"]

    # manifest: members, label maps, cases
    assert [m.name for m in collection.members] == ["Dataset011_SynthCT", "Dataset012_SynthMR"]
    assert collection.members[1].foreground_labels == [1, 2, 3]
    assert collection.members[0].cases == [f"ct_{i:03d}" for i in range(6)]
    # splits: 5 folds, each fold's val disjoint, every case validated exactly once, keys name the member
    assert len(collection.splits) == 5
    all_val = [k for s in collection.splits for k in s["val"]]
    assert sorted(all_val) == sorted([f"Dataset011_SynthCT/ct_{i:03d}" for i in range(6)]
                                     + [f"Dataset012_SynthMR/mr_{i:03d}" for i in range(7)])
    for s in collection.splits:
        assert not set(s["train"]) & set(s["val"])
        assert {collection.resolve_key(k)[0].name for k in s["val"]} == {m.name for m in collection.members}
    # fold k of the collection = fold k of each member's nnU-Net split (seed 12345)
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    ct_splits = generate_crossval_split([f"ct_{i:03d}" for i in range(6)], seed=12345, n_splits=5)
    assert collection.fold_cases(2, "val")["Dataset011_SynthCT"] == list(ct_splits[2]["val"])

    # every case preprocessed, at the joint spacing, normalised per modality
    for member in collection.members:
        for case in member.cases:
            for f in (f"{case}.b2nd", f"{case}_seg.b2nd", f"{case}.pkl"):
                assert (Path(member.preprocessed_folder) / f).is_file()
    mr = load_b2nd(Path(collection.members[1].preprocessed_folder) / "mr_000.b2nd")[0]
    body = mr != 0
    # z-scored before resampling; cubic resampling to the joint spacing smooths the noise a little
    assert abs(mr[body].mean()) < 0.1 and 0.5 < mr[body].std() < 1.1
    ct = load_b2nd(Path(collection.members[0].preprocessed_folder) / "ct_000.b2nd")[0]
    fg = plans_ct["foreground_intensity_properties_per_channel"]["0"]
    lo = (fg["percentile_00_5"] - fg["mean"]) / fg["std"]
    hi = (fg["percentile_99_5"] - fg["mean"]) / fg["std"]
    assert ct.min() >= lo - 0.1 and ct.max() <= hi + 0.1  # clipped to the dataset window (then smoothed)
    # CT spacing 2.5 mm in z -> resampled to its member spacing: 12 slices * 2.5 / spacing
    assert ct.shape[0] == round(12 * 2.5 / spacing)


def test_rerun_skips_finished_and_redoes_partial(two_datasets):
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--plan_for", "gpu")
    folder = Path(load_collection(900).members[0].preprocessed_folder)
    mtimes = {f.name: f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()}
    # an interrupted case: data written, .pkl (written last) missing
    (folder / "ct_003.pkl").unlink()
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--plan_for", "gpu")
    after = {f.name: f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()}
    assert (folder / "ct_003.pkl").is_file()
    assert after["ct_003.b2nd"] != mtimes["ct_003.b2nd"]  # redone
    assert after["ct_000.b2nd"] == mtimes["ct_000.b2nd"]  # finished work kept
    assert not (folder / ".partial").exists()
    # --clean redoes everything
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--clean")
    assert (folder / "ct_000.b2nd").stat().st_mtime_ns != mtimes["ct_000.b2nd"]


def test_changed_plan_invalidates_preprocessed_cases(two_datasets):
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--plan_for", "gpu")
    folder = Path(load_collection(900).members[1].preprocessed_folder)
    before = load_b2nd(folder / "mr_000.b2nd").shape
    run_cli("-d", "11", "12", "-np", "1", "--memory_gb", "1", "--target_spacing", "2")
    assert load_b2nd(folder / "mr_000.b2nd").shape != before


def test_single_dataset_is_its_own_collection(nnunet_env):
    make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 5, "Solo", num_cases=5, seed=3)
    run_cli("-d", "5", "-np", "2", "--memory_gb", "1")
    collection = load_collection("Solo")
    assert collection.folder == str(nnunet_env["nnUNet_preprocessed"] / "Dataset005_Solo")
    assert collection.members[0].name == "Dataset005_Solo"
    # nnU-Net's plain case names, so nnU-Net's own tools read the same splits file
    assert sorted(k for s in collection.splits for k in s["val"]) == [f"case_{i:03d}" for i in range(5)]


def test_memory_budget_sizes_patch_and_network():
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[200, 200, 200]] * 3,
                   "foreground_intensity_properties_per_channel": {"0": {}},
                   "median_relative_size_after_cropping": 1.0}
    member = MemberSummary("Dataset001_Big", {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}},
                           fingerprint)
    small = plan_collection([member], memory_gb=0.5, hardware="gpu")
    large = plan_collection([member], memory_gb=40, hardware="gpu")
    cs, cl = small["configurations"]["3d_fullres"], large["configurations"]["3d_fullres"]
    assert np.prod(cl["patch_size"]) >= np.prod(cs["patch_size"])
    assert (cl["architecture"]["arch_kwargs"]["features_per_stage"][0]
            >= cs["architecture"]["arch_kwargs"]["features_per_stage"][0])
    assert (np.prod(cl["patch_size"]) > np.prod(cs["patch_size"])
            or cl["architecture"] != cs["architecture"] or cl["batch_size"] > cs["batch_size"])
    assert cl["patch_size"] == [128, 128, 128]  # the paper's patch caps the target
    assert large["iris"]["estimated_training_memory_gb"] <= 40
    assert small["iris"]["estimated_training_memory_gb"] <= 0.5 or cs["patch_size"] == [64, 64, 64]


def test_native_spacing_rule_keeps_coarse_members_coarse_and_inference_follows_the_references():
    """The four real members' voxel sizes: 1 mm MR crops and brains, 3.9 x 3.9 x 2.5 mm CT, 1.25 x 1.25 x 7.7 mm MR."""
    from iris_nnu.preprocessing.planner import member_spacing, plans_for_member, run_spacing

    def member(name: str, spacing_zyx: list[float], shape: list[int]) -> MemberSummary:
        fingerprint = {"spacings": [spacing_zyx] * 3, "shapes_after_crop": [shape] * 3,
                       "foreground_intensity_properties_per_channel": {"0": {}},
                       "median_relative_size_after_cropping": 1.0}
        return MemberSummary(name, {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}}, fingerprint)

    members = [member("Dataset001_Crops", [1, 1, 1], [36, 50, 35]), member("Dataset002_Brain", [1, 1, 1], [134, 138, 173]),
               member("Dataset003_CT", [2.5, 3.906, 3.906], [128, 128, 128]),
               member("Dataset004_Abdomen", [7.7, 1.25, 1.25], [35, 248, 256])]
    plans = plan_collection(members, hardware="cpu")
    assert plans["configurations"]["3d_fullres"]["spacing"] == [1.5] * 3  # the finest: the CPU plan's floor
    spacings = {m.name: member_spacing(plans, m.name) for m in members}
    assert spacings == {"Dataset001_Crops": 1.5, "Dataset002_Brain": 1.5, "Dataset003_CT": 3.35,
                        "Dataset004_Abdomen": 2.3}
    assert plans_for_member(plans, "Dataset003_CT")["configurations"]["3d_fullres"]["spacing"] == [3.35] * 3
    # the CT keeps about its voxel count (128^3 = 2.1 M; at 1.5 mm it would be 23 M voxels)
    ct_shape = plans["iris"]["members"]["Dataset003_CT"]["median_shape_at_target_spacing"]
    assert 1.5e6 < np.prod(ct_shape) < 3e6
    # a run follows its references by the same rule; a fixed plan (and plans from before the rule) keep theirs
    assert run_spacing(plans, [[3.906, 3.906, 2.5]]) == 3.35
    assert run_spacing(plans, [[0.8, 0.8, 0.8], [1, 1, 1]]) == 1.5
    fixed = plan_collection(members, hardware="cpu", spacing_rule="fixed")
    assert {member_spacing(fixed, m.name) for m in members} == {1.65}  # the median native edge
    assert run_spacing(fixed, [[3.906, 3.906, 2.5]]) == 1.65
    del fixed["iris"]["spacing_rule"]
    assert run_spacing(fixed, [[3.906, 3.906, 2.5]]) == 1.65


def test_cpu_plan_is_small_and_coarse_gpu_plan_is_paper_like():
    def member(spacing: float) -> MemberSummary:
        fingerprint = {"spacings": [[spacing] * 3] * 3, "shapes_after_crop": [[200, 200, 200]] * 3,
                       "foreground_intensity_properties_per_channel": {"0": {}},
                       "median_relative_size_after_cropping": 1.0}
        return MemberSummary("Dataset001_Big", {"channel_names": {"0": "MR"},
                                                "labels": {"background": 0, "a": 1}}, fingerprint)

    cpu = plan_collection([member(1.0)], hardware="cpu")
    c = cpu["configurations"]["3d_fullres"]
    assert (c["spacing"], c["patch_size"], cpu["iris"]["planned_for"]) == ([1.5] * 3, [32, 32, 32], "cpu")
    assert cpu["iris"]["memory_budget_gb"] == 0.5 and c["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert plan_collection([member(2.0)], hardware="cpu")["configurations"]["3d_fullres"]["spacing"] == [2.0] * 3
    given = plan_collection([member(1.0)], target_spacing=1.0, patch_size=[48, 48, 48], memory_gb=1,
                            hardware="cpu")["configurations"]["3d_fullres"]
    assert (given["spacing"], given["patch_size"]) == ([1.0] * 3, [48, 48, 48])  # what is given is kept
    gpu = plan_collection([member(1.0)], memory_gb=40, hardware="gpu")
    g = gpu["configurations"]["3d_fullres"]
    assert (g["spacing"], g["patch_size"], gpu["iris"]["planned_for"]) == ([1.0] * 3, [128] * 3, "gpu")
    if not torch.cuda.is_available():
        assert plan_collection([member(1.0)])["iris"]["planned_for"] == "cpu"
        with pytest.raises(ValueError, match="memory_gb"):
            plan_collection([member(1.0)], hardware="gpu")


def test_fixed_patch_size_adapts_only_width_and_batch(capsys):
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[200, 200, 200]] * 3,
                   "foreground_intensity_properties_per_channel": {"0": {}},
                   "median_relative_size_after_cropping": 1.0}
    member = MemberSummary("Dataset001_Big", {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}},
                           fingerprint)
    small = plan_collection([member], memory_gb=0.3, patch_size=[32, 48, 32])["configurations"]["3d_fullres"]
    large = plan_collection([member], memory_gb=4, patch_size=[32, 48, 32])["configurations"]["3d_fullres"]
    assert small["patch_size"] == large["patch_size"] == [32, 48, 32]
    assert (large["architecture"]["arch_kwargs"]["features_per_stage"][0]
            > small["architecture"]["arch_kwargs"]["features_per_stage"][0])
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_collection([member], patch_size=[32, 40, 32])
    with pytest.raises(SystemExit):
        run_cli("-d", "1", "--patch_size", "32", "32")  # argparse: three values
    assert "--patch_size" in capsys.readouterr().err


def test_percentile_zscore_normalization():
    from iris_nnu.preprocessing.normalization import PercentileZScoreNormalization

    rng = np.random.default_rng(0)
    image = rng.normal(500, 100, (20, 20, 20)).astype(np.float32)
    image[0, 0, :5] = 1e6  # outliers that a plain z-score would let dominate
    out = PercentileZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image.copy())
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    assert out.max() < 3  # outliers clipped at the 98th percentile
    # with the non-zero mask: statistics inside it, zero outside
    seg = np.zeros_like(image, dtype=np.int8)
    seg[:5] = -1
    out = PercentileZScoreNormalization(use_mask_for_norm=True, intensityproperties={}).run(image.copy(), seg)
    assert np.all(out[:5] == 0) and abs(out[5:].mean()) < 1e-4 and abs(out[5:].std() - 1) < 1e-4


def test_auto_spacing_rule():
    def member(spacing):
        return MemberSummary("x", {}, {"spacings": [spacing], "shapes_after_crop": [[10, 10, 10]]})

    assert auto_target_spacing([member([1, 1, 1])]) == 1.0
    assert auto_target_spacing([member([2.5, 0.8, 0.8]), member([1, 1, 1]), member([1.5, 1.5, 1.5])]) == \
        pytest.approx(1.15)  # median of 1.17, 1.0, 1.5


# ---------------------------------------------------------------- bad input: one line, exit 2, no traceback

def expect_error(capsys, *argv: str) -> str:
    return cli_error(capsys, main, "iris_plan_and_preprocess", argv)


def test_missing_dataset(nnunet_env, capsys):
    assert "dataset 42" in expect_error(capsys, "-d", "42")


def test_missing_env(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert "nnUNet_preprocessed is not set" in expect_error(capsys, "-d", "1")


def test_bad_dataset_json(nnunet_env, capsys):
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 21, "Bad", num_cases=5))
    (folder / "dataset.json").write_text("{not json")
    msg = expect_error(capsys, "-d", "21")
    assert "Dataset021_Bad" in msg and "dataset.json" in msg and "not valid JSON" in msg
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    assert "missing key 'channel_names'" in expect_error(capsys, "-d", "21")


def test_labels_not_consecutive(nnunet_env, capsys):
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 22, "Gap", num_cases=5))
    dj = json.loads((folder / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "a": 1, "b": 3}
    (folder / "dataset.json").write_text(json.dumps(dj))
    msg = expect_error(capsys, "-d", "22")
    assert "not consecutive" in msg and "dataset.json" in msg


def test_geometry_mismatch(nnunet_env, capsys):
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 23, "Geo", num_cases=5))
    label = folder / "labelsTr" / "case_002.nii.gz"
    img = sitk.ReadImage(str(label))
    write_volume(sitk.GetArrayFromImage(img)[:, :-2], img.GetSpacing(), str(label))
    msg = expect_error(capsys, "-d", "23")
    assert "case_002_0000.nii.gz" in msg and "size" in msg and "Dataset023_Geo" in msg
    write_volume((sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "case_002_0000.nii.gz"))) > 0).astype(np.uint8),
                 (1.0, 1.0, 2.0), str(label))
    msg = expect_error(capsys, "-d", "23")
    assert "spacing/origin/direction differ: spacing (1.0, 1.0, 1.0) vs (1.0, 1.0, 2.0) mm" in msg, msg
    write_volume((sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / "case_002_0000.nii.gz"))) > 0).astype(np.uint8),
                 (1.0, 1.0, 1.0), str(label), origin=(0.0, 10.0, 0.0))
    assert "(10 mm apart)" in expect_error(capsys, "-d", "23")


def test_a_long_error_text_is_cut_at_a_word():
    from iris_nnu.errors import brief

    long = RuntimeError("The size of tensor a (64) must match the size of tensor b (32) at non-singleton dimension 1 "
                        * 5 + "\nsecond line")
    text = brief(long, limit=100)
    assert text.endswith(" ...") and len(text) <= 104 and not text[:-4].endswith(("tens", "dimensio"))
    assert long.args[0].startswith(text[:-4]) and "second line" not in text
    assert brief(ValueError("short")) == "short" and brief(KeyError()) == "KeyError"


def test_unreadable_file(nnunet_env, capsys):
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 24, "Corrupt", num_cases=5))
    (folder / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"this is not an image")
    msg = expect_error(capsys, "-d", "24")
    assert "case_001_0000.nii.gz" in msg and "unreadable" in msg


def test_verify_finds_undeclared_label_values(nnunet_env, capsys):
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 25, "Extra", num_cases=5, num_classes=2))
    label = folder / "labelsTr" / "case_004.nii.gz"
    img = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 7
    write_volume(arr, img.GetSpacing(), str(label))
    msg = expect_error(capsys, "-d", "25", "--verify_dataset_integrity", "-np", "1")
    assert "case_004.nii.gz" in msg and "[7]" in msg


def test_verify_refuses_truncated_and_nan_nifti(nnunet_env, capsys):
    # SimpleITK reads a truncated .nii.gz with zeros for the missing part and NaN in NIfTI as 0 (issue 22)
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 26, "Cut", num_cases=5))
    image = folder / "imagesTr" / "case_003_0000.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape == (24, 32, 32)  # what let it pass
    msg = expect_error(capsys, "-d", "26", "--verify_dataset_integrity", "-np", "1")
    assert "Dataset026_Cut" in msg and "case_003_0000.nii.gz: truncated" in msg
    image.write_bytes(whole)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    array[3, 4, 5] = np.nan
    write_volume(array, (1.0, 1.0, 1.0), str(image))
    msg = expect_error(capsys, "-d", "26", "--verify_dataset_integrity", "-np", "1")
    assert "case_003_0000.nii.gz: contains NaN or infinite values" in msg


def test_members_with_different_channel_counts(nnunet_env, capsys):
    make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 26, "One", num_cases=5)
    folder = Path(make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 27, "Two", num_cases=5))
    for f in (folder / "imagesTr").iterdir():
        os.link(f, str(f).replace("_0000", "_0001"))
    dj = json.loads((folder / "dataset.json").read_text())
    dj["channel_names"] = {"0": "T1", "1": "T2"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    msg = expect_error(capsys, "-d", "26", "27", "-np", "1")
    assert "different numbers of input channels" in msg


def test_collection_id_taken(nnunet_env, capsys):
    make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 31, "A", num_cases=5)
    make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 32, "B", num_cases=5)
    make_raw_dataset(str(nnunet_env["nnUNet_raw"]), 900, "Other", num_cases=5)
    assert "collection id 900 is taken" in expect_error(capsys, "-d", "31", "32")


def test_interrupted_run_registers_no_collection(two_datasets, monkeypatch):
    import iris_nnu.preprocessing.plan_and_preprocess as pp

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pp, "preprocess_member", interrupted)
    with pytest.raises(SystemExit) as exc:
        run_cli("-d", "11", "12", "-np", "1")
    assert exc.value.code == 130
    assert not (two_datasets["nnUNet_preprocessed"] / "Dataset900_SynthCT_SynthMR" / "manifest.json").exists()


# ---------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_hippocampus_and_oasis(nnunet_env, shared_data):
    raw = nnunet_env["nnUNet_raw"]
    link_real_dataset(shared_data, raw, "Dataset001_Hippocampus")
    link_real_dataset(shared_data, raw, "Dataset002_OASISBrain")
    run_cli("-d", "1", "2", "-np", "2", "--target_spacing", "2", "--plan_for", "gpu", "--memory_gb", "2")
    collection = load_collection(900)
    assert [m.name for m in collection.members] == ["Dataset001_Hippocampus", "Dataset002_OASISBrain"]
    assert len(collection.members[0].cases) == 200 and len(collection.members[1].cases) == 15
    assert collection.members[1].foreground_labels == list(range(1, 86))
    cfg = collection.plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [2.0] * 3
    # OASIS (brains cropped from 256x256x160 at 1 mm) is the largest member: it sets the target patch
    fingerprint = json.loads((nnunet_env["nnUNet_preprocessed"] / "Dataset002_OASISBrain"
                              / "dataset_fingerprint.json").read_text())
    oasis_at_2mm = np.median(fingerprint["shapes_after_crop"], axis=0) * 1.0 / 2.0
    assert collection.plans["iris"]["target_patch_size"] == [int(np.ceil(s / 16) * 16) for s in oasis_at_2mm]
    assert set(collection.plans["iris"]["members"]) == {m.name for m in collection.members}
    for member in collection.members:
        assert len([f for f in os.listdir(member.preprocessed_folder) if f.endswith(".pkl")]) == len(member.cases)


def test_every_case_is_preprocessed_in_the_plans_voxel_order(nnunet_env, capsys):
    """A case stored with its axes permuted and reversed (the same physical scan as another case) is preprocessed
    to the same voxels: the plans' orientation (default: the code most cases are stored in) holds for every case."""
    raw = nnunet_env["nnUNet_raw"]
    folder = Path(make_raw_dataset(str(raw), 61, "Stored", num_cases=5, shape_zyx=(20, 24, 28), seed=9, prefix="st"))
    for sub, ending in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        image = sitk.Flip(sitk.PermuteAxes(sitk.ReadImage(str(folder / sub / f"st_000{ending}")), (2, 0, 1)),
                          [True, False, False])
        sitk.WriteImage(image, str(folder / sub / f"st_004{ending}"))  # st_004 = st_000 stored otherwise
    run_cli("-d", "61", "-np", "1", "--plan_for", "cpu", "--target_spacing", "1")
    collection = load_collection(61)
    assert collection.plans["iris"]["orientation"] == "LPS"  # 4 of 5 cases
    data = Path(collection.members[0].preprocessed_folder)
    a, b = load_b2nd(data / "st_000.b2nd"), load_b2nd(data / "st_004.b2nd")
    assert a.shape == b.shape and np.allclose(a, b, atol=1e-4)
    assert np.array_equal(load_b2nd(data / "st_000_seg.b2nd"), load_b2nd(data / "st_004_seg.b2nd"))
    assert "--orientation RRS: not an orientation code" in expect_error(capsys, "-d", "61", "--orientation", "RRS")


def test_orientation_stored_keeps_each_member_in_its_own_voxel_order(nnunet_env):
    """--orientation stored: no common voxel order (the plans' null, as the bundled model was planned); each member
    is preprocessed in the order its cases are stored in, so weights that learnt a member that way keep seeing it so."""
    raw = nnunet_env["nnUNet_raw"]
    make_raw_dataset(str(raw), 62, "Lps", num_cases=5, shape_zyx=(20, 24, 28), seed=3, prefix="lp")
    folder = Path(make_raw_dataset(str(raw), 63, "Permuted", num_cases=5, shape_zyx=(20, 24, 28), seed=4,
                                   prefix="pe"))
    for path in sorted((folder / "imagesTr").glob("*.nii.gz")) + sorted((folder / "labelsTr").glob("*.nii.gz")):
        sitk.WriteImage(sitk.PermuteAxes(sitk.ReadImage(str(path)), (2, 0, 1)), str(path))  # stored in another order
    run_cli("-d", "62", "63", "-np", "1", "--plan_for", "cpu", "--target_spacing", "1", "--orientation", "stored")
    collection = load_collection(900)
    assert collection.plans["iris"]["orientation"] is None
    shapes = {m.name: load_b2nd(Path(m.preprocessed_folder) / f"{m.cases[0]}.b2nd").shape[1:]
              for m in collection.members}
    stored = {name: sitk.ReadImage(str(raw / name / "imagesTr" / f"{prefix}_000_0000.nii.gz")).GetSize()[::-1]
              for name, prefix in (("Dataset062_Lps", "lp"), ("Dataset063_Permuted", "pe"))}
    assert stored["Dataset062_Lps"] != stored["Dataset063_Permuted"]
    for name, shape in shapes.items():  # cropping may trim the blobs' margins, never reorder the axes
        assert np.argsort(shape).tolist() == np.argsort(stored[name]).tolist(), name
