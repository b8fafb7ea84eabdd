"""IrisTrainer / iris_train: episodes, learning, exact continuation, model folder, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error
from synthetic import make_raw_dataset

from iris_nnu.errors import IrisInputError
from iris_nnu.preprocessing.collection import load_collection
from iris_nnu.model.position import position_prior_from_labels
from iris_nnu.preprocessing.frames import body_frame
from iris_nnu.preprocessing.plan_and_preprocess import main as plan_main
from iris_nnu.trainers import episodes
from iris_nnu.trainers.episodes import EpisodicDataLoader, MemberEpisodes
from iris_nnu.trainers.iris_trainer import IrisTrainer, WarmupExponentialLR
from iris_nnu.model.loss import MaskedDiceBCELoss
from iris_nnu.trainers.train import main as train_main
from iris_nnu.trainers.train import parse_arguments, resolve_trainer
from iris_nnu.trainers.validation import one_shot_validation, reference_following

# Small enough to train on 2 CPU cores in a test; plans are data, so tests write it into them.
TINY_ARCHITECTURE = {"features_per_stage": [8, 16, 32], "blocks_per_stage": 1, "num_query_tokens": 4,
                     "task_scales": 2, "attention_heads": 2, "attention_depth": 1}


def shrink_plans(plans_file: Path) -> None:
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["architecture"]["arch_kwargs"] = TINY_ARCHITECTURE
    configuration["patch_size"] = [32, 32, 32]
    configuration["batch_size"] = 2
    plans_file.write_text(json.dumps(plans))


@pytest.fixture(scope="module")
def collection_env(tmp_path_factory):
    """Two synthetic members (CT-like, MR-like) planned as collection 900, with a tiny network in the plans."""
    root = tmp_path_factory.mktemp("iris")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / name).mkdir()
            mp.setenv(name, str(root / name))
        mp.setenv("nnUNet_n_proc_DA", "0")
        make_raw_dataset(str(root / "nnUNet_raw"), 11, "SynthCT", num_cases=6, shape_zyx=(24, 32, 32),
                         modality="CT", num_classes=2, seed=1, prefix="ct")
        make_raw_dataset(str(root / "nnUNet_raw"), 12, "SynthMR", num_cases=6, shape_zyx=(28, 28, 28),
                         modality="MR", num_classes=3, seed=2, prefix="mr")
        plan_main(["-d", "11", "12", "-np", "1", "--memory_gb", "0.3", "--plan_for", "gpu"])
        pre = root / "nnUNet_preprocessed"
        for folder in ("Dataset900_SynthCT_SynthMR", "Dataset011_SynthCT", "Dataset012_SynthMR"):
            shrink_plans(pre / folder / "IrisPlans.json")
        yield root


def make_trainer(epochs: int, iterations: int, val_iterations: int = 2,
                 trainer_class: type[IrisTrainer] = IrisTrainer) -> IrisTrainer:
    collection = load_collection(900)
    trainer = trainer_class(dict(collection.plans), "3d_fullres", 0, collection.dataset_json, torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    return trainer


def test_episodes_pair_cases_of_one_member(collection_env):
    trainer = make_trainer(1, 1)
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    collection = trainer.collection
    train_cases = collection.fold_cases(0, "train")
    kinds = set()
    for _ in range(16):
        batch = next(train_loader)
        member = collection.member(batch["member"])
        k = len(batch["classes"])
        kinds.add(batch["kind"])
        assert 1 <= k <= trainer.max_classes_per_episode
        if batch["kind"] == "labels":
            assert k <= len(member.foreground_labels)
            assert set(batch["classes"]) <= set(member.foreground_labels)
        else:  # tasks made for the episode (task augmentation, supervoxels) are no label: the memory bank skips them
            assert all(c < 0 for c in batch["classes"])
        assert batch["data"].shape == batch["reference"].shape == (2, 1, 32, 32, 32)
        assert batch["reference_masks"].shape == (2, k, 32, 32, 32)
        assert [t.shape[1] for t in batch["target"]] == [k, k]  # deep supervision: full and half resolution
        for query, reference in batch["keys"]:
            # the reference is ANOTHER case (self-supervised: a second crop of the same scan) ...
            assert (query == reference) == (batch["kind"] == "self-supervised")
            assert {query, reference} <= set(train_cases[member.name])  # ... of the SAME member, training split
        # the reference crop is centred on one of the episode's classes
        assert batch["present"].any(dim=1).all()
        assert torch.equal(batch["present"], batch["reference_masks"].flatten(2).amax(2) > 0)
    assert "labels" in kinds and kinds <= {"labels", "augmented", "self-supervised"}
    assert not any(c < 0 for m in trainer.memory_bank.values() for c in m)


def _unique_intensity_member(tmp_path, monkeypatch) -> MemberEpisodes:
    """One 1 mm member whose every voxel has its own intensity (a ramp), planned at 1 mm: no resampling, so a voxel
    of one crop can be found in another crop of the same scan by its value."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    folder = make_raw_dataset(str(tmp_path / "nnUNet_raw"), 31, "Ramp", num_cases=5, shape_zyx=(48, 48, 48),
                              num_classes=2, seed=5, prefix="rp")
    for f in sorted(Path(folder, "imagesTr").iterdir()):
        image = sitk.ReadImage(str(f))
        ramp = np.arange(48 ** 3, dtype=np.float32).reshape(48, 48, 48) + 1 + 2e5 * (sitk.GetArrayFromImage(image) > 0)
        out = sitk.GetImageFromArray(ramp)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(f))
    plan_main(["-d", "31", "-np", "1", "--plan_for", "cpu", "--target_spacing", "1"])
    pre = tmp_path / "nnUNet_preprocessed" / "Dataset031_Ramp"
    labels = json.loads((pre / "dataset.json").read_text())["labels"]
    cases = [f"rp_{i:03d}" for i in range(5)]
    return MemberEpisodes("Dataset031_Ramp", str(pre / "IrisPlans_3d_fullres"), labels, cases, cases)


def test_self_supervised_episodes_hold_two_crops_of_one_scan_with_the_same_masks(tmp_path, monkeypatch):
    member = _unique_intensity_member(tmp_path, monkeypatch)
    monkeypatch.setattr(episodes, "REFERENCE_MASK_PERTURBATION_P", 0.0)  # imperfect references: not here

    def as_is(**batch):
        return batch

    loader = EpisodicDataLoader([member], 2, (32,) * 3, (32,) * 3, 8, as_is, as_is, seed=0, position_grid=8,
                                self_supervised_p=1.0)
    overlaps = []
    for _ in range(6):
        batch = loader.generate_train_batch()
        assert batch["kind"] == "self-supervised" and all(q == r for q, r in batch["keys"])
        assert batch["reference_positions"].shape[:2] == batch["reference_masks"].shape[:2]
        for b in range(2):
            query, reference = batch["data"][b, 0].numpy(), batch["reference"][b, 0].numpy()
            # normalisation clips the extremes to one value: match the voxels whose value is unique
            values, counts = np.unique(np.concatenate([query.ravel(), reference.ravel()]), return_counts=True)
            repeated = set(values[counts > 2].tolist())
            where = {float(v): i for i, v in enumerate(query.ravel()) if float(v) not in repeated}
            shared = [(i, where[float(v)]) for i, v in enumerate(reference.ravel()) if float(v) in where]
            overlaps.append(len(shared) / reference.size)
            r_index, q_index = (np.array(x) for x in zip(*shared))
            masks_r = batch["reference_masks"][b].flatten(1).numpy()
            masks_q = batch["target"][b].flatten(1).numpy()
            present = batch["present"][b].numpy()
            assert present.sum() >= 2  # several supervoxels, each held by both crops
            # every voxel the two crops share has the same masks in both: one scan, one set of supervoxels
            assert np.array_equal(masks_r[:, r_index], masks_q[:, q_index])
            for k in np.flatnonzero(present):
                assert masks_q[k].sum() > 0 and masks_r[k].sum() > 0
    assert min(overlaps) >= (2 / 3) ** 3 - 0.01  # centres at most a third of a patch apart per axis


def test_a_member_s_own_episode_mix_overrides_the_loader_s(tmp_path, monkeypatch):
    member = dataclasses.replace(_unique_intensity_member(tmp_path, monkeypatch), self_supervised_p=0.0,
                                 augmented_p=0.0)

    def as_is(**batch):
        return batch

    loader = EpisodicDataLoader([member], 2, (32,) * 3, (32,) * 3, 8, as_is, as_is, seed=0, position_grid=8,
                                self_supervised_p=1.0, augmented_p=1.0)
    assert {loader.generate_train_batch()["kind"] for _ in range(4)} == {"labels"}


def test_permuted_episodes_put_query_reference_and_coordinates_in_one_random_voxel_order(tmp_path, monkeypatch):
    member = _unique_intensity_member(tmp_path, monkeypatch)

    def as_is(**batch):
        return batch

    def axes_by_stride(volume: np.ndarray) -> tuple[int, ...]:
        """The array axes from the ramp's largest step to its smallest: how the scan's axes were ordered."""
        steps = [np.median(np.abs(np.diff(volume, axis=a))) for a in range(3)]
        return tuple(int(a) for a in np.argsort(steps)[::-1])

    loader = EpisodicDataLoader([member], 2, (32,) * 3, (32,) * 3, 8, as_is, as_is, seed=0, position_grid=8,
                                self_supervised_p=1.0, permute_axes=True)
    assert EpisodicDataLoader([member], 2, (32,) * 3, (32, 32, 16), 8, as_is, as_is,
                              permute_axes=True).permutable_axes == (0, 1)  # only equal sides trade places
    orders, channel_of_axis = set(), set()
    for _ in range(8):
        batch = loader.generate_train_batch()
        for b in range(2):
            query_order = axes_by_stride(batch["data"][b, 0].numpy())
            assert query_order == axes_by_stride(batch["reference"][b, 0].numpy())  # permuted together
            orders.add(query_order)
            # each voxel keeps its scan coordinates: the channel that changes along an axis follows the axis
            coordinates = batch["coordinates"][b].numpy()
            changing = [int(np.argmax([np.abs(np.diff(coordinates[c], axis=a)).mean() for c in range(3)]))
                        for a in query_order]
            channel_of_axis.add(tuple(changing))
    assert len(orders) >= 3  # several of the six orders in 16 episodes
    assert len(channel_of_axis) == 1  # the scan's first axis always carries the same coordinate, wherever it lies


def test_augmented_tasks_are_made_from_the_labels():
    labels = torch.zeros(8, 8, 8, dtype=torch.int16)
    labels[1:4, 1:7, 1:7] = 1
    labels[4:7, 1:7, 1:7] = 2
    coordinates = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 8)] * 3, indexing="ij"))
    image = torch.linspace(-2, 2, 8).view(1, 8, 1, 1).expand(1, 8, 8, 8)
    body = labels >= 0
    body_labels = torch.where(torch.arange(8).view(8, 1, 1) == 7, -1, labels.long()).to(torch.int16)
    extras = episodes._extras(coordinates, image, body_labels[None])
    specs = [episodes.MaskSpec("union", (1, 2)), episodes.MaskSpec("part", (1,), axis=1, below=True),
             episodes.MaskSpec("body"), episodes.MaskSpec("threshold", threshold=0.0), episodes.MaskSpec("label", (2,))]
    masks = episodes._spec_masks(specs, labels, extras, {1: torch.zeros(3)}, 6).bool()
    assert torch.equal(masks[0], (labels == 1) | (labels == 2))
    assert torch.equal(masks[1], (labels == 1) & (coordinates[1] < 0)) and 0 < masks[1].sum() < (labels == 1).sum()
    assert torch.equal(masks[2], body & (torch.arange(8).view(8, 1, 1) < 7))
    assert torch.equal(masks[3], masks[2] & (image[0] > 0))
    assert torch.equal(masks[4], labels == 2) and not masks[5].any()  # padded to k


def test_augmented_episodes_from_the_loader(collection_env):
    collection = load_collection(900)
    member = collection.members[1]  # 3 classes
    cases = collection.fold_cases(0, "train")[member.name]
    episodes_member = MemberEpisodes(member.name, member.preprocessed_folder, member.labels, cases, cases)

    def as_is(**batch):
        return batch

    loader = EpisodicDataLoader([episodes_member], 2, (32,) * 3, (32,) * 3, 4, as_is, as_is, seed=1,
                                position_grid=8, augmented_p=1.0)
    made = 0
    for _ in range(10):
        batch = loader.generate_train_batch()
        assert batch["kind"] == "augmented" and all(q != r for q, r in batch["keys"])
        made += sum(c < 0 for c in batch["classes"])
        assert batch["present"].any()
        assert batch["reference_positions"].shape[:2] == batch["reference_masks"].shape[:2]
    assert made >= 10


def test_colocated_episodes_show_the_same_structures_in_query_and_reference(tmp_path, monkeypatch):
    """Scans much larger than the patch, small structures laid out alike in every scan (a brain's parcels in a
    32^3 patch): in
    co-located episodes most (crop, class) pairs hold the class in both the query and the reference crop; with
    classes drawn from the whole scan most hold it in neither, which taught the default model nothing of OASIS."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    make_raw_dataset(str(tmp_path / "nnUNet_raw"), 21, "Scattered", num_cases=5, shape_zyx=(112, 112, 112),
                     num_classes=8, seed=3, prefix="sc", radii=(0.05, 0.08), spread=0.8, layout_seed=4)
    plan_main(["-d", "21", "-np", "1", "--plan_for", "cpu"])
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset021_Scattered"
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    cases = [f"sc_{i:03d}" for i in range(5)]
    member = MemberEpisodes("Scattered", str(folder / "IrisPlans_3d_fullres"), labels, cases, cases)

    def as_is(**batch):
        return batch

    def shares(colocated_p: float, off_anchor_p: float = 0.0) -> tuple[float, float, float]:
        """Shares of (crop, class) pairs with the class in the query crop, in both query and reference, and in the
        reference only (a window without a structure the reference shows: a negative example)."""
        monkeypatch.setattr(episodes, "COLOCATED_P", colocated_p)
        monkeypatch.setattr(episodes, "OFF_ANCHOR_P", off_anchor_p)
        in_query, in_both, negative, pairs = 0, 0, 0, 0
        # one seed's 20 episodes put the negative share anywhere in 0.03-0.07 (0.07-0.18 off-anchor): pool 3 seeds
        for seed in range(3):
            np.random.seed(seed)  # nnU-Net's patch placement draws from numpy's global generator
            loader = EpisodicDataLoader([member], 2, (32,) * 3, (32,) * 3, 8, as_is, as_is, seed=seed)
            for _ in range(40):
                batch = loader.generate_train_batch()
                query_holds = batch["target"].flatten(2).amax(2) > 0
                in_query += int(query_holds.sum())
                in_both += int((query_holds & batch["present"]).sum())
                negative += int((~query_holds & batch["present"]).sum())
                pairs += query_holds.numel()
        return in_query / pairs, in_both / pairs, negative / pairs

    default_off_anchor = episodes.OFF_ANCHOR_P
    colocated, scattered = shares(1.0), shares(0.0)
    assert colocated[0] > 0.75 and colocated[1] > 0.6, colocated  # measured 0.86, 0.76 (scattered 0.34, 0.24)
    assert colocated[1] > scattered[1] + 0.25, (colocated, scattered)
    # off-anchor query crops show windows without the structure: the negatives a whole-scan sliding window meets
    off_anchor = shares(1.0, default_off_anchor)
    # measured 0.10 vs 0.05 (3 seeds x 40 episodes, before and after task augmentation)
    assert off_anchor[2] > 1.5 * colocated[2] + 0.01, (off_anchor, colocated)


def test_member_sampling_weights_from_plans_and_manifest_format(collection_env):
    folder = collection_env / "nnUNet_preprocessed" / "Dataset900_SynthCT_SynthMR"
    plans_file, manifest_file = folder / "IrisPlans.json", folder / "manifest.json"
    original_plans, original_manifest = plans_file.read_text(), manifest_file.read_text()
    try:
        plans = json.loads(original_plans)
        plans["iris"]["member_sampling_weights"] = {"Dataset011_SynthCT": 3.0}
        plans_file.write_text(json.dumps(plans))
        trainer = make_trainer(1, 1)
        trainer.initialize()
        train_loader, _ = trainer.get_dataloaders()
        assert list(train_loader.data_loader.member_probabilities) == [0.75, 0.25]  # SynthMR keeps weight 1
        manifest = json.loads(original_manifest)
        manifest["format"] = 99
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(IrisInputError, match="format 99"):
            load_collection(900)
    finally:
        plans_file.write_text(original_plans)
        manifest_file.write_text(original_manifest)


def test_prior_alignment_affine_registers_every_case_to_its_member_s_template(collection_env, monkeypatch):
    """plans' iris.prior_alignment "affine": each case's frame (its crops' coordinates and its classes' priors) is its
    body frame registered to the member's template, its first training case (the registration itself:
    test_alignment.py); "frames" leaves every body frame as it is, and an unknown value is refused."""
    folder = collection_env / "nnUNet_preprocessed" / "Dataset900_SynthCT_SynthMR"
    plans_file = folder / "IrisPlans.json"
    original = plans_file.read_text()
    calls = []

    def registered(data, frame, anchor):  # a frame that differs from the body frame, to see it used
        calls.append((data.shape, frame, anchor))
        return dataclasses.replace(frame, centre=tuple(c + 3.0 for c in frame.centre))
    monkeypatch.setattr(episodes, "aligned_frame", registered)
    try:
        for value in ("affine", "sideways"):
            plans = json.loads(original)
            plans["iris"]["prior_alignment"] = value
            plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["position_grid"] = 8
            plans_file.write_text(json.dumps(plans))
            if value == "sideways":
                with pytest.raises(ValueError, match="prior_alignment"):
                    make_trainer(1, 1)
                continue
            trainer = make_trainer(1, 1)
            trainer.initialize()
            loader = trainer.get_dataloaders()[0].data_loader
            assert loader.position_grid == 8
            for member in loader.members:
                template = sorted(member.reference_cases)[0]
                template_data, template_seg = loader._load(member, template)[:2]
                for case in sorted(member.reference_cases)[:3]:
                    data, seg = loader._load(member, case)[:2]
                    frame = loader._frame(member, case, seg)
                    shape, body, anchor = calls[-1]
                    assert shape == data.shape and body == body_frame(seg)
                    assert anchor.frame == body_frame(template_seg)
                    assert anchor.spacing == member.alignment_spacing == (trainer.collection.plans["iris"][
                        "members"][member.name]["spacing"][0],) * 3
                    assert frame.centre == tuple(c + 3.0 for c in body.centre)
                    priors = loader._priors[(member.name, case)]
                    # the loader builds every class's prior in one pass, this one alone: the same up to rounding
                    torch.testing.assert_close(priors[member.foreground_labels[0]], position_prior_from_labels(
                        torch.from_numpy(np.asarray(seg[0])), member.foreground_labels[:1], loader.position_grid,
                        frame)[0], rtol=1e-5, atol=1e-6)
        plans_file.write_text(original)
        trainer = make_trainer(1, 1)
        trainer.initialize()
        loader = trainer.get_dataloaders()[0].data_loader
        calls.clear()
        member = loader.members[0]
        seg = loader._load(member, member.reference_cases[0])[1]
        assert member.alignment_spacing is None and loader._frame(member, member.reference_cases[0], seg) == \
            body_frame(seg) and not calls
    finally:
        plans_file.write_text(original)


def test_prior_dropout_trains_some_batches_with_uniform_priors(collection_env):
    """plans' iris.prior_dropout p: a share p of training batches encode their references with uniform position
    priors (so the network must segment by appearance too); 0 (the default) keeps every prior."""
    plans_file = collection_env / "nnUNet_preprocessed" / "Dataset900_SynthCT_SynthMR" / "IrisPlans.json"
    original = plans_file.read_text()
    try:
        uniform = {}
        for dropout in (0.0, 0.5, 1.0):
            plans = json.loads(original)
            plans["iris"]["prior_dropout"] = dropout
            plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["position_grid"] = 8
            plans_file.write_text(json.dumps(plans))
            np.random.seed(0)  # nnU-Net's patch placement draws from numpy's global generator
            trainer = make_trainer(1, 8)
            trainer.episode_seed = 0
            trainer.initialize()
            passed = []
            encode = trainer.iris_network.encode_task

            def recording(reference, masks, classes, positions=None):
                passed.append(positions.cpu())
                return encode(reference, masks, classes, positions)
            trainer.iris_network.encode_task = recording
            loader = trainer.get_dataloaders()[0]
            replaced = []
            for _ in range(8):
                batch = next(loader)
                trainer.train_step(batch)
                own = batch["reference_positions"]
                assert torch.equal(passed[-1], own) or bool((passed[-1] == 1).all())
                if not bool((own == 1).all()):  # a prior that says something (a whole-body task's may not)
                    replaced.append(not torch.equal(passed[-1], own))
            uniform[dropout] = replaced
            assert trainer.iris_network.position_weight.grad is not None  # in the graph either way (DDP)
        assert not any(uniform[0.0]) and all(uniform[1.0]) and len(uniform[1.0]) >= 4
        assert any(uniform[0.5]) and not all(uniform[0.5])
    finally:
        plans_file.write_text(original)


def test_masked_loss_ignores_absent_classes():
    loss = MaskedDiceBCELoss()
    logits = torch.randn(2, 3, 8, 8, 8)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    valid = torch.tensor([[True, False, True], [True, True, False]])
    garbage = logits.clone()
    garbage[0, 1] = 100
    garbage[1, 2] = -100
    assert torch.allclose(loss(logits, target, valid), loss(garbage, target, valid))
    assert not torch.allclose(loss(logits, target, torch.ones_like(valid)), loss(garbage, target,
                                                                                  torch.ones_like(valid)))
    perfect = target * 40 - 20
    assert loss(perfect, target, valid) < 1e-3


def test_learning_rate_schedule():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1)
    schedule = WarmupExponentialLR(optimizer, 2e-3, total_iterations=1000)
    assert schedule.warmup == 25
    assert schedule.lr_at(0) == pytest.approx(2e-3 / 25)
    assert schedule.lr_at(24) == pytest.approx(2e-3)
    assert schedule.lr_at(999) == pytest.approx(2e-5, rel=0.02)
    lrs = [schedule.lr_at(i) for i in range(25, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_the_fine_tuning_trainer_continues_at_a_tenth_of_the_learning_rate(collection_env):
    """-tr IrisTrainer_FineTune (for -pretrained_weights): peak 2e-4, ending at IrisTrainer's last rate."""
    trainer = make_trainer(epochs=4, iterations=10, trainer_class=resolve_trainer("IrisTrainer_FineTune"))
    trainer.initialize()
    schedule = trainer.lr_schedule
    assert max(schedule.lr_at(i) for i in range(40)) == pytest.approx(2e-4)
    assert schedule.lr_at(39) == pytest.approx(2e-5, rel=0.1)


def load_padded(member, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A preprocessed case, image (1,1,32,32,32) and labels (1,1,32,32,32), zero-padded to the patch."""
    import blosc2

    folder = Path(member.preprocessed_folder)
    image = torch.from_numpy(blosc2.open(str(folder / f"{case}.b2nd"))[:])
    labels = torch.from_numpy(blosc2.open(str(folder / f"{case}_seg.b2nd"))[:]).clamp_min(0)
    pad = [p for s in reversed(image.shape[1:]) for p in (0, 32 - s)]
    return torch.nn.functional.pad(image, pad)[None].float(), torch.nn.functional.pad(labels, pad)[None]


def one_shot_dice(trainer: IrisTrainer) -> float:
    """Mean Dice over members of one-shot segmentation of validation cases (whole preprocessed volumes)."""
    net = trainer.iris_network.eval()
    net.set_deep_supervision(False)
    dice = []
    for member in trainer.collection.members:
        train_cases = trainer.collection.fold_cases(0, "train")[member.name]
        val_cases = trainer.collection.fold_cases(0, "val")[member.name]
        classes = member.foreground_labels
        ref_image, ref_labels = load_padded(member, train_cases[0])
        masks = torch.cat([(ref_labels == c).float() for c in classes], 1)
        with torch.no_grad():
            task = net.encode_task(ref_image, masks, classes)
            for case in val_cases:
                image, labels = load_padded(member, case)
                predicted = net(image, task) > 0
                for k, c in enumerate(classes):
                    truth = labels[0, 0] == c
                    p = predicted[0, k]
                    if truth.any():
                        dice.append(float(2 * (p & truth).sum() / (p.sum() + truth.sum())))
    return float(np.mean(dice))


@pytest.fixture(scope="module")
def trained(collection_env) -> tuple[IrisTrainer, float, float]:
    """A tiny model trained for 600 iterations; its one-shot Dice and final validation Dice before training."""
    torch.manual_seed(0)
    np.random.seed(0)  # nnU-Net's patch placement draws from numpy's global generator
    # 400 iterations left the 3-class member's weakest class at 0.27-0.43 depending on the episodes' random stream
    trainer = make_trainer(epochs=60, iterations=10)
    trainer.episode_seed = 0
    trainer.final_lr_fraction = 1.0  # no decay after the warm-up
    # label episodes only: these 400 iterations measure how the label classes are learnt and decoded together (with
    # the default mix, half of them are self-supervised or augmented, and the 3-class member's weakest class fell
    # 0.43 -> 0.31); the other kinds of episode have their own tests
    trainer.self_supervised_p = trainer.augmented_p = 0.0
    trainer.initialize()
    untrained = one_shot_dice(trainer)
    trainer.perform_actual_validation()
    validation = Path(trainer.output_folder) / "validation"
    untrained_validation = json.loads((validation / "summary.json").read_text())["mean_over_members"]
    trainer.run_training()
    return trainer, untrained, untrained_validation


def test_training_learns_one_shot_segmentation(trained):
    trainer, untrained, untrained_validation = trained
    validation = Path(trainer.output_folder) / "validation"
    losses = trainer.logger.local_logger.my_fantastic_logging["train_losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    trained = one_shot_dice(trainer)
    assert trained > untrained + 0.25 and trained > 0.4, (untrained, trained)
    # final validation: one-shot, whole cases in their original geometry, nnU-Net's summary.json per member
    trainer.perform_actual_validation()
    overall = json.loads((validation / "summary.json").read_text())
    for member in trainer.collection.members:
        folder = validation / member.name
        val_cases = trainer.collection.fold_cases(0, "val")[member.name]
        assert sorted(f.name for f in folder.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in val_cases)
        member_summary = json.loads((folder / "summary.json").read_text())
        assert member_summary["foreground_mean"]["Dice"] == pytest.approx(overall["one_shot_mean_dice"][member.name])
    assert overall["mean_over_members"] > untrained_validation + 0.15, (untrained_validation, overall)
    # the memory bank holds an embedding for every (member, class) seen
    for member in trainer.collection.members:
        assert set(trainer.memory_bank[member.name]) <= set(member.foreground_labels)
        assert len(trainer.memory_bank[member.name]) >= 1


def test_classes_decoded_together_as_well_as_one_per_pass_and_each_follows_its_reference(trained):
    trainer = trained[0]
    together = one_shot_validation(trainer, "together")
    separately = one_shot_validation(trainer, "separately", classes_per_pass=1)
    for member in trainer.collection.members:
        assert separately[member.name] > 0.3, separately
        # the defect this guards against: together 0.27, one per pass 0.61 (hippocampus, issue 10); this tiny model
        # measured 0.91 / 0.90 (CT-like, 2 classes) and 0.39 / 0.43 (MR-like, 3 classes) after 400 iterations
        assert together[member.name] >= separately[member.name] - 0.05, (together, separately)
    # asked for one class alone, the model segments that class rather than the others: a model that ignores its
    # reference (segments "any structure") gives equal rows. The 3-class MR-like member follows only weakly after 400
    # iterations, by thread count and machine (diagonal mean minus off-diagonal mean: +0.16 with 1 thread, +0.01 with
    # 2 on this machine; the same at the commit before the position prior), so the margin is asked of the best member
    following = {}
    for member, dice in reference_following(trainer).items():
        off_diagonal = dice[~np.eye(len(dice), dtype=bool)]
        assert dice.diagonal().min() > 0.35, (member, dice)
        following[member] = dice.diagonal().mean() - off_diagonal.mean()
    assert max(following.values()) > 0.25, following


def test_model_folder_and_exact_continuation(collection_env, monkeypatch):
    results = collection_env / "nnUNet_results"
    original_epoch_end = IrisTrainer.on_epoch_end
    seen = {}

    def interrupt_after_second_epoch(self):
        original_epoch_end(self)
        if self.current_epoch == 2:
            seen["optimizer"] = self.optimizer.state_dict()
            seen["bank"] = {m: {c: [t.clone() for t in v] for c, v in b.items()} for m, b in self.memory_bank.items()}
            raise KeyboardInterrupt

    monkeypatch.setattr(IrisTrainer, "on_epoch_end", interrupt_after_second_epoch)
    with pytest.raises(SystemExit) as exc:
        train_main(["900", "1", "-device", "cpu", "--epochs", "4", "--iterations_per_epoch", "2",
                    "--val_iterations", "1"])
    assert exc.value.code == 130
    monkeypatch.setattr(IrisTrainer, "on_epoch_end", original_epoch_end)

    model = results / "Dataset900_SynthCT_SynthMR" / "IrisTrainer__IrisPlans__3d_fullres"
    fold = model / "fold_1"
    for name in ("plans.json", "dataset.json", "manifest.json"):
        assert (model / name).is_file()
    assert (fold / "checkpoint_latest.pth").is_file() and (fold / "progress.png").is_file()
    checkpoint = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and checkpoint["iris_settings"]["num_epochs"] == 4

    # --c: the same epoch, optimiser state and memory bank, and the run's own settings
    collection = load_collection(900)
    resumed = IrisTrainer(dict(collection.plans, continue_training=True), "3d_fullres", 1,
                          collection.dataset_json, torch.device("cpu"))
    resumed.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 2
    state = resumed.optimizer.state_dict()
    for key, value in seen["optimizer"]["state"].items():
        assert torch.equal(state["state"][key]["exp_avg"], value["exp_avg"])
    for member, bank in seen["bank"].items():
        for label, tokens in bank.items():
            assert all(torch.equal(a, b) for a, b in zip(resumed.memory_bank[member][label], tokens))

    started = {}
    original_start, original_validation = IrisTrainer.on_train_start, IrisTrainer.perform_actual_validation

    def record_start(self):
        original_start(self)
        started["epoch"], started["epochs"] = self.current_epoch, self.num_epochs

    monkeypatch.setattr(IrisTrainer, "on_train_start", record_start)
    monkeypatch.setattr(IrisTrainer, "perform_actual_validation", lambda self, save_probabilities=False: None)
    train_main(["900", "1", "-device", "cpu", "--c"])
    assert started == {"epoch": 2, "epochs": 4}
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4
    assert not (fold / "checkpoint_latest.pth").exists()
    # the axes the loader mirrored query and reference together on: what inference's mirrored TTA flips
    assert tuple(final["inference_allowed_mirroring_axes"]) == (0, 1, 2)

    # --val --npz: the final validation alone, with per-class probabilities beside each segmentation
    monkeypatch.setattr(IrisTrainer, "perform_actual_validation", original_validation)
    train_main(["900", "1", "-device", "cpu", "--val", "--npz"])
    for member in collection.members:
        for case in collection.fold_cases(1, "val")[member.name]:
            saved = np.load(fold / "validation" / member.name / f"{case}.npz")
            segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / member.name
                                                                     / f"{case}.nii.gz")))
            assert list(saved["classes"]) == member.foreground_labels
            assert saved["probabilities"].shape == (len(member.foreground_labels), *segmentation.shape)
            # a voxel is foreground where some class's probability passes 0.5 (float16: not at 0.5 exactly)
            highest = saved["probabilities"].max(0).astype(np.float32)
            assert (segmentation[highest > 0.505] > 0).all() and (segmentation[highest < 0.495] == 0).all()
            assert (fold / "validation" / member.name / f"{case}.pkl").is_file()

    # --val_best: the final weights are loaded, then the best ones for the validation
    loaded, original_load = [], IrisTrainer.load_checkpoint

    def record_load(self, filename):
        loaded.append(Path(filename).name)
        original_load(self, filename)

    monkeypatch.setattr(IrisTrainer, "load_checkpoint", record_load)
    train_main(["900", "1", "-device", "cpu", "--val", "--val_best"])
    assert loaded == ["checkpoint_final.pth", "checkpoint_best.pth"]

    # -pretrained_weights: another fold starts from these weights (loaded with weights_only=True)
    monkeypatch.setattr(IrisTrainer, "load_checkpoint", original_load)

    def record_weights(self):
        original_start(self)
        started["weights"] = {k: v.clone() for k, v in self.iris_network.state_dict().items()}

    monkeypatch.setattr(IrisTrainer, "on_train_start", record_weights)
    monkeypatch.setattr(IrisTrainer, "perform_actual_validation", lambda self, save_probabilities=False: None)
    train_main(["900", "0", "-device", "cpu", "--epochs", "1", "--iterations_per_epoch", "1", "--val_iterations", "1",
                "-pretrained_weights", str(fold / "checkpoint_final.pth")])
    assert all(torch.equal(started["weights"][k], v) for k, v in final["network_weights"].items())


# ---------------------------------------------------------------- bad input

def expect_error(capsys, *argv: str) -> str:
    return cli_error(capsys, train_main, "iris_train", argv)


def test_unknown_dataset(nnunet_env, capsys):
    assert "not found in nnUNet_preprocessed" in expect_error(capsys, "77", "0")


def test_dataset_not_planned_by_iris(nnunet_env, capsys):
    (nnunet_env["nnUNet_preprocessed"] / "Dataset005_NnunetOnly").mkdir()
    msg = expect_error(capsys, "5", "0")
    assert "Dataset005_NnunetOnly" in msg and "not planned with iris_plan_and_preprocess" in msg


def test_fold_without_split(collection_env, capsys):
    msg = expect_error(capsys, "900", "7", "-device", "cpu")
    assert "fold 7" in msg and "splits_final.json" in msg


def test_nnunet_argument_forms(capsys):
    assert parse_arguments(["900", "0"]).fold == 0
    assert parse_arguments(["900", "3d_fullres", "all"]).fold == "all"  # DATASET CONFIGURATION FOLD
    assert parse_arguments(["900", "1", "-pretrained_weights", "w.pth"]).pretrained_weights == "w.pth"
    assert "configuration '2d'" in expect_error(capsys, "900", "2d", "0")
    assert "fold must be an integer" in expect_error(capsys, "900", "3d_fullres", "x")


def test_second_plans_name_lives_beside_the_first_and_trains_with_p(collection_env, monkeypatch, capsys):
    pre, results = collection_env / "nnUNet_preprocessed", collection_env / "nnUNet_results"
    plan_main(["-d", "11", "12", "-np", "1", "--memory_gb", "0.3", "--plan_for", "gpu",
               "-overwrite_plans_name", "IrisPlansCoarse", "--target_spacing", "2"])
    for folder in ("Dataset900_SynthCT_SynthMR", "Dataset011_SynthCT", "Dataset012_SynthMR"):
        shrink_plans(pre / folder / "IrisPlansCoarse.json")
    default, coarse = load_collection(900), load_collection(900, "IrisPlansCoarse")
    assert default.plans["configurations"]["3d_fullres"]["spacing"] != [2.0] * 3
    assert coarse.plans["configurations"]["3d_fullres"]["spacing"] == [2.0] * 3
    for a, b in zip(default.members, coarse.members):
        assert a.preprocessed_folder.endswith("IrisPlans_3d_fullres") and Path(a.preprocessed_folder).is_dir()
        assert b.preprocessed_folder.endswith("IrisPlansCoarse_3d_fullres") and Path(b.preprocessed_folder).is_dir()
    monkeypatch.setattr(IrisTrainer, "perform_actual_validation", lambda self, save_probabilities=False: None)
    train_main(["900", "2", "-p", "IrisPlansCoarse", "-device", "cpu", "--epochs", "1", "--iterations_per_epoch",
                "1", "--val_iterations", "1"])
    model = results / "Dataset900_SynthCT_SynthMR" / "IrisTrainer__IrisPlansCoarse__3d_fullres"
    assert (model / "fold_2" / "checkpoint_final.pth").is_file()
    assert json.loads((model / "plans.json").read_text())["plans_name"] == "IrisPlansCoarse"
    assert "no finished plans 'NoSuch'" in expect_error(capsys, "900", "0", "-p", "NoSuch")
    assert "use letters" in cli_error(capsys, plan_main, "iris_plan_and_preprocess",
                                      ["-d", "11", "-overwrite_plans_name", "a_b"])


def _probe_records(folder: Path) -> dict[int, list[dict]]:
    return {int(f.stem[4:]): [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted(folder.glob("rank*.jsonl"))}


def _assert_ranks_agree(records: dict[int, list[dict]], world: int) -> None:
    assert sorted(records) == list(range(world))
    steps = [len(r) for r in records.values()]
    assert len(set(steps)) == 1 and steps[0] > 0
    for step in zip(*records.values()):
        assert all(r["world"] == world and r["batch"] == 2 // world for r in step)  # the plans' batch 2 is split
        assert len({r["weights"] for r in step}) == 1  # DDP: identical weights after every step
        assert len({r["bank"] for r in step}) == 1  # the memory bank too
    assert any(len({json.dumps(r["episode"]) for r in step}) == world for step in zip(*records.values()))


def test_distributed_training_on_two_cpu_processes_and_resume(collection_env, tmp_path, monkeypatch):
    """-num_gpus 2 -device cpu: two gloo processes train one model; --c resumes it with one process."""
    monkeypatch.setenv("IRIS_PROBE_DIR", str(tmp_path))
    fold = collection_env / "nnUNet_results" / "Dataset900_SynthCT_SynthMR" / "ProbeTrainer__IrisPlans__3d_fullres" \
        / "fold_3"
    assert train_main(["900", "3", "-num_gpus", "2", "-device", "cpu", "-tr", "ddp_probe.ProbeTrainer",
                       "--epochs", "2", "--iterations_per_epoch", "2", "--val_iterations", "1"]) == 0
    records = _probe_records(tmp_path)
    _assert_ranks_agree(records, 2)
    assert len(records[0]) == 4
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and not (fold / "checkpoint_latest.pth").exists()
    assert (fold / "validation" / "summary.json").is_file()
    # --c with another number of processes: one, from epoch 2 to 3
    for f in tmp_path.glob("rank*.jsonl"):
        f.unlink()
    monkeypatch.setattr(IrisTrainer, "perform_actual_validation", lambda self, save_probabilities=False: None)
    assert train_main(["900", "3", "--c", "--epochs", "3", "-device", "cpu", "-tr", "ddp_probe.ProbeTrainer"]) == 0
    resumed = _probe_records(tmp_path)
    assert [r["epoch"] for r in resumed[0]] == [2, 2] and resumed[0][0]["world"] == 1
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 3


def test_a_rank_that_dies_ends_the_run_with_one_line(collection_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IRIS_PROBE_DIR", str(tmp_path))
    monkeypatch.setenv("IRIS_PROBE_FAIL_RANK", "1")
    with pytest.raises(SystemExit) as exc:
        train_main(["900", "0", "-num_gpus", "2", "-device", "cpu", "-tr", "ddp_probe.ProbeTrainer", "--epochs", "1",
                    "--iterations_per_epoch", "2", "--val_iterations", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("iris_train: error: rank 1 failed") and "probe: this rank dies" in err


def test_distributed_training_under_torchrun(collection_env, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "IRIS_PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    from iris_nnu.trainers.train import free_port

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "iris_nnu.trainers.train", "900", "4", "-device", "cpu",
                           "-tr", "ddp_probe.ProbeTrainer", "--epochs", "1", "--iterations_per_epoch", "2",
                           "--val_iterations", "1"], env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_ranks_agree(_probe_records(tmp_path), 2)
    fold = collection_env / "nnUNet_results" / "Dataset900_SynthCT_SynthMR" / "ProbeTrainer__IrisPlans__3d_fullres" \
        / "fold_4"
    assert (fold / "checkpoint_final.pth").is_file()


def test_unsupported_options(collection_env, capsys):
    assert "at most that many" in expect_error(capsys, "900", "0", "-num_gpus", "3", "-device", "cpu")
    assert "unknown trainer" in expect_error(capsys, "900", "0", "-tr", "NoSuchTrainer")
    assert "file not found" in expect_error(capsys, "900", "0", "--pretrained_weights", "/no/such.pth")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in expect_error(capsys, "900", "0", "-device", "cuda")


def dead_pid() -> int:
    """The id of a process that has ended."""
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_continue_without_a_complete_checkpoint_is_an_error(collection_env, capsys):
    # issue 22: --c after a kill during the first checkpoint write started a fresh 1000 x 250 run
    fold = collection_env / "nnUNet_results" / "Dataset900_SynthCT_SynthMR" / "IrisTrainer__IrisPlans__3d_fullres" \
        / "fold_2"
    msg = expect_error(capsys, "900", "2", "-device", "cpu", "--c")
    assert f"{fold} does not exist" in msg and "leave out --c" in msg and not fold.exists()
    fold.mkdir(parents=True)
    torch.save({"network_weights": {"w": torch.zeros(1000)}, "current_epoch": 1}, fold / "checkpoint_best.pth")
    whole = (fold / "checkpoint_best.pth").read_bytes()
    (fold / "checkpoint_latest.pth").write_bytes(whole[:len(whole) // 2])  # killed while written
    stale = fold / f".checkpoint_latest.partial{dead_pid()}.pth"
    stale.write_bytes(whole[:100])
    os.utime(stale, (1e9, 1e9))
    live = fold / f".checkpoint_latest.partial{os.getppid()}.pth"  # a running process's: kept
    live.write_bytes(b"being written")
    msg = expect_error(capsys, "900", "2", "-device", "cpu", "--c")
    assert "no complete checkpoint_final.pth or checkpoint_latest.pth" in msg
    assert "checkpoint_latest.pth is unreadable, truncated or not a checkpoint" in msg
    assert "other files: checkpoint_best.pth" in msg and f"removed partial file(s) of a killed run: {stale.name}" in msg
    assert "leave out --c" in msg and not stale.exists() and live.exists()
    assert sorted(p.name for p in fold.iterdir()) == sorted([live.name, "checkpoint_best.pth",
                                                              "checkpoint_latest.pth"])  # no log, no fresh run
    (fold / "checkpoint_final.pth").write_bytes(whole)  # readable, but not a training checkpoint
    msg = expect_error(capsys, "900", "2", "-device", "cpu", "--c")
    assert "checkpoint_final.pth is not an iris_train checkpoint (no optimizer_state" in msg
    live.unlink()


def test_pretrained_weights_that_are_not_a_checkpoint(collection_env, tmp_path, capsys):
    (tmp_path / "foreign.pth").write_text("not a checkpoint")
    torch.save({"network_weights": {"w": torch.zeros(1000)}}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    for name in ("foreign.pth", "cut.pth"):
        msg = expect_error(capsys, "900", "0", "-device", "cpu", "-pretrained_weights", str(tmp_path / name))
        assert f"{tmp_path / name}: unreadable, truncated or not a checkpoint" in msg
    msg = expect_error(capsys, "900", "0", "-device", "cpu", "-pretrained_weights", str(tmp_path / "other.pth"))
    assert "no 'network_weights'; it holds state_dict" in msg
    msg = expect_error(capsys, "900", "0", "-device", "cpu", "-pretrained_weights", str(tmp_path / "whole.pth"))
    assert "not weights of this architecture" in msg


def test_look_alike_structures_are_told_apart_by_where_they_lie(tmp_path, monkeypatch):
    """Two structures of the same brightness in scans twice the patch wide (like cortical parcels in a brain): a
    window often shows one of them alone, and only where it lies in the scan says which. A small model trained with
    the position prior segments each as its own class one-shot, through the whole predictor path (sliding window
    with scan coordinates); marking both twins as the class would cap a class's Dice at 0.67."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    make_raw_dataset(str(tmp_path / "nnUNet_raw"), 31, "Twins", num_cases=8, shape_zyx=(32, 64, 64), num_classes=2,
                     seed=5, prefix="tw", radii=(0.15, 0.2), spread=0.6, layout_seed=5, alike=True)
    plan_main(["-d", "31", "-np", "1", "--plan_for", "cpu", "--target_spacing", "1"])
    plans_file = tmp_path / "nnUNet_preprocessed" / "Dataset031_Twins" / "IrisPlans.json"
    shrink_plans(plans_file)
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["position_grid"] = 8
    plans_file.write_text(json.dumps(plans))
    torch.manual_seed(0)
    np.random.seed(0)
    collection = load_collection(31)
    trainer = IrisTrainer(dict(collection.plans), "3d_fullres", 0, collection.dataset_json, torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 30, 10, 1
    trainer.episode_seed, trainer.final_lr_fraction = 0, 1.0
    trainer.initialize()
    assert trainer.iris_network.position_grid == 8
    trainer.run_training()
    one_shot_validation(trainer, "twins")
    summary = json.loads((Path(trainer.output_folder) / "twins" / "Dataset031_Twins" / "summary.json").read_text())
    dice = {c: summary["mean"][c]["Dice"] for c in ("1", "2")}
    assert min(dice.values()) > 0.75, dice


def test_validation_with_a_reference_that_lacks_a_class(tmp_path, monkeypatch):
    """Not every organ is in every case (HeadNeckCT): the validation reference (the training case holding most
    classes) may lack one; its task must then hold the others, each with its own label value (the validation once
    indexed classes 1 and 3 as 1 and 2, and failed)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = Path(make_raw_dataset(str(tmp_path / "nnUNet_raw"), 41, "Lacking", num_cases=6, shape_zyx=(24, 32, 32),
                                   num_classes=3, seed=6, prefix="lk"))
    for f in (folder / "labelsTr").iterdir():  # class 2 in no case: every training case lacks it
        label = sitk.ReadImage(str(f))
        array = sitk.GetArrayFromImage(label)
        array[array == 2] = 0
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(label)
        sitk.WriteImage(out, str(f))
    plan_main(["-d", "41", "-np", "1", "--plan_for", "cpu"])
    plans_file = tmp_path / "nnUNet_preprocessed" / "Dataset041_Lacking" / "IrisPlans.json"
    shrink_plans(plans_file)
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["position_grid"] = 8
    plans_file.write_text(json.dumps(plans))
    collection = load_collection(41)
    trainer = IrisTrainer(dict(collection.plans), "3d_fullres", 0, collection.dataset_json, torch.device("cpu"))
    trainer.initialize()
    from iris_nnu.trainers.validation import _member_tasks, _predictor

    predictor = _predictor(trainer, trainer.iris_network.eval(), None)
    (member, _, task, cases), = list(_member_tasks(trainer, predictor, 1))
    assert task.classes == [1, 3] and task.positions.shape[1] == 2
    summary = one_shot_validation(trainer, max_cases=1)
    assert set(summary) == {"Dataset041_Lacking"}
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(trainer.output_folder) / "validation" /
                                                        "Dataset041_Lacking" / f"{cases[0]}.nii.gz")))
    assert set(np.unique(written).tolist()) <= {0, 1, 3}


def test_a_member_of_images_only_plans_preprocesses_and_teaches_a_structure_never_labelled(tmp_path, monkeypatch):
    """Unlabelled scans (no labelsTr/) are planned without label statistics and train self-supervised episodes
    only; a tiny model trained on them alone then segments, one-shot from a labelled reference, structures it never
    saw labelled, better than the same network untrained."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    raw = tmp_path / "nnUNet_raw"
    # structures a few supervoxels across (radii 0.3-0.45 of the half-size), as anatomy is at the patch's scale
    unlabelled = Path(make_raw_dataset(str(raw), 51, "Unlabelled", num_cases=6, shape_zyx=(24, 32, 32),
                                       num_classes=2, seed=7, prefix="un", radii=(0.3, 0.45)))
    shutil.rmtree(unlabelled / "labelsTr")
    (unlabelled / "dataset.json").write_text(json.dumps({**json.loads((unlabelled / "dataset.json").read_text()),
                                                         "labels": {"background": 0}}))
    make_raw_dataset(str(raw), 52, "Labelled", num_cases=6, shape_zyx=(24, 32, 32), num_classes=2, seed=8,
                     prefix="lb", radii=(0.3, 0.45))
    plan_main(["-d", "51", "52", "-np", "1", "--plan_for", "cpu", "--verify_dataset_integrity"])
    pre = tmp_path / "nnUNet_preprocessed"
    assert not (pre / "Dataset051_Unlabelled" / "gt_segmentations").exists()
    fingerprint = json.loads((pre / "Dataset051_Unlabelled" / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["spacings"]) == 6 and fingerprint["foreground_intensity_properties_per_channel"]["0"]["std"] > 0
    for folder in ("Dataset900_Unlabelled_Labelled", "Dataset051_Unlabelled", "Dataset052_Labelled"):
        shrink_plans(pre / folder / "IrisPlans.json")
    plans_file = pre / "Dataset900_Unlabelled_Labelled" / "IrisPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["iris"]["member_sampling_weights"] = {"Dataset052_Labelled": 0.0}  # its labels are for evaluation only
    plans_file.write_text(json.dumps(plans))

    torch.manual_seed(0)
    np.random.seed(0)
    trainer = make_trainer(epochs=60, iterations=10, val_iterations=1)
    trainer.episode_seed = 0
    trainer.final_lr_fraction = 1.0
    trainer.initialize()
    labelled = trainer.collection.member("Dataset052_Labelled")

    fractions = []  # chance: a guess of the structure's size at random places scores about its volume fraction

    def dice() -> float:
        net = trainer.iris_network.eval()
        net.set_deep_supervision(False)
        reference = trainer.collection.fold_cases(0, "train")[labelled.name][0]
        ref_image, ref_labels = load_padded(labelled, reference)
        scores = []
        with torch.no_grad():
            task = net.encode_task(ref_image, torch.cat([(ref_labels == c).float() for c in (1, 2)], 1), [1, 2])
            for case in trainer.collection.fold_cases(0, "train")[labelled.name][1:]:
                image, labels = load_padded(labelled, case)
                predicted = net(image, task) > 0
                for k, c in enumerate((1, 2)):
                    truth = labels[0, 0] == c
                    scores.append(float(2 * (predicted[0, k] & truth).sum() / (predicted[0, k].sum() + truth.sum())))
                    fractions.append(float(truth.float().mean()))
        return float(np.mean(scores))

    untrained = dice()
    trainer.run_training()
    kinds = trainer.dataloader_train  # the loader saw only the unlabelled member's self-supervised episodes
    batch = next(kinds)
    assert batch["member"] == "Dataset051_Unlabelled" and batch["kind"] == "self-supervised"
    trained = dice()
    chance = float(np.mean(fractions))
    # measured: untrained 0.012, trained 0.137, chance 0.03 (600 iterations of a 8..32-wide network)
    assert trained > untrained + 0.08 and trained > 3 * chance, (untrained, trained, chance)


def test_held_out_classes_are_never_asked_for(collection_env):
    """plans' iris.held_out_classes: structures kept out of every episode, to measure ones never trained on."""
    collection = load_collection(900)
    member = collection.members[1]  # classes 1, 2, 3
    cases = collection.fold_cases(0, "train")[member.name]
    held = MemberEpisodes(member.name, member.preprocessed_folder, member.labels, cases, cases, held_out=(2,))
    assert held.foreground_labels == [1, 3]

    def as_is(**batch):
        return batch

    loader = EpisodicDataLoader([held], 2, (32,) * 3, (32,) * 3, 4, as_is, as_is, seed=2, augmented_p=0.5)
    for _ in range(12):
        batch = loader.generate_train_batch()
        assert 2 not in batch["classes"]
        if batch["kind"] == "labels":
            assert set(batch["classes"]) <= {1, 3}
