"""Tests of the Iris network (iris_nnu.model) on tiny CPU configurations."""
from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from iris_nnu.model import (IrisArchitecture, IrisNetwork, TaskEmbedding, TaskMismatchError, build_network,
                            count_parameters, estimate_memory_bytes)
from iris_nnu.model.ops import full_res_masked_average, pixel_shuffle_3d, pixel_unshuffle_3d

TINY = dict(features_per_stage=(4, 8, 16, 32, 64), blocks_per_stage=1, num_query_tokens=3, attention_heads=2)
PATCH = (32, 32, 32)


def make_net(seed: int = 0, **overrides) -> IrisNetwork:
    torch.manual_seed(seed)
    return IrisNetwork(1, **{**TINY, **overrides}).eval()


def make_pair(k: int, batch: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, *PATCH, generator=g)
    masks = (torch.rand(batch, k, *PATCH, generator=g) > 0.8).float()
    return image, masks


@pytest.fixture(scope="module")
def net() -> IrisNetwork:
    return make_net()


def test_output_shapes_for_k_1_to_16(net):
    image, masks = make_pair(16)
    query = torch.randn(2, 1, *PATCH)
    with torch.no_grad():
        for k in range(1, 17):
            task = net.encode_task(image, masks[:, :k])
            assert [tuple(t.shape) for t in task.tokens] == [(1, k, 4, 64), (1, k, 4, 32), (1, k, 4, 16)]
            out = net(query, task)
            assert out.shape == (2, k, *PATCH) and torch.isfinite(out).all()


def test_deep_supervision_outputs_and_toggles():
    net = make_net(deep_supervision=True)
    image, masks = make_pair(3)
    with torch.no_grad():
        task = net.encode_task(image, masks)
        outs = net(image, task)
        assert [tuple(o.shape) for o in outs] == [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8),
                                                  (1, 3, 4, 4, 4)]
        net.decoder.deep_supervision = False  # the way nnU-Net's trainer toggles it
        assert net.deep_supervision is False and net(image, task).shape == (1, 3, *PATCH)
        net.set_deep_supervision(True)
        assert isinstance(net(image, task), list)


def test_permuting_classes_permutes_outputs(net):
    image, masks = make_pair(5)
    query = torch.randn(1, 1, *PATCH)
    perm = [3, 0, 4, 1, 2]
    with torch.no_grad():
        task = net.encode_task(image, masks, classes=[10, 20, 30, 40, 50])
        out = net(query, task)
        permuted_task = net.encode_task(image, masks[:, perm], classes=[[10, 20, 30, 40, 50][p] for p in perm])
        torch.testing.assert_close(net(query, permuted_task), out[:, perm], atol=1e-4, rtol=1e-4)
        # a subset is decoded without the other classes' tokens (self-attention over classes): nearly, not exactly,
        # the same maps
        torch.testing.assert_close(net(query, task.select([40, 10])), out[:, [3, 0]], atol=1e-3, rtol=1e-3)


def test_every_parameter_gets_a_gradient():
    net = make_net(deep_supervision=True).train()
    image, masks = make_pair(2, batch=2)
    outs = net(torch.randn(2, 1, *PATCH), net.encode_task(image, masks))
    sum(F.binary_cross_entropy_with_logits(o, torch.rand_like(o)) for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_mean_of_two_identical_embeddings_equals_one(net):
    image, masks = make_pair(3)
    with torch.no_grad():
        task = net.encode_task(image, masks, classes=[1, 5, 7])
    mean = TaskEmbedding.concatenate([task, task]).mean()
    assert mean.batch_size == 1 and mean.classes == [1, 5, 7] and mean.model_id == task.model_id
    for a, b in zip(mean.tokens, task.tokens):
        torch.testing.assert_close(a, b)


def test_mean_uses_only_references_where_the_class_is_present(net):
    image, masks = make_pair(2, batch=2)
    masks[1, 1] = 0  # class 2 is absent from reference 1
    with torch.no_grad():
        task = net.encode_task(image, masks)
    assert task.present.tolist() == [[True, True], [True, False]]
    mean = task.mean()
    for m, t in zip(mean.tokens, task.tokens):
        torch.testing.assert_close(m[0, 1], t[0, 1])
        torch.testing.assert_close(m[0, 0], t[:, 0].mean(0))
    masks[0, 1] = 0
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[2\]"):
        net.encode_task(image, masks).mean()


def test_select_and_concatenate(net):
    image, masks = make_pair(3)
    with torch.no_grad():
        a = net.encode_task(image, masks, classes=[3, 1, 2])
        b = net.encode_task(image, masks[:, :2], classes=[4, 1])
    with pytest.raises(KeyError, match="99"):
        a.select([1, 99])
    both = TaskEmbedding.concatenate([a, b])
    assert both.classes == [1, 2, 3, 4] and both.batch_size == 2
    assert both.present.tolist() == [[True, True, True, False], [True, False, False, True]]
    torch.testing.assert_close(both.tokens[0][0, :3], a.select([1, 2, 3]).tokens[0][0])
    torch.testing.assert_close(both.tokens[1][1, [0, 3]], b.select([1, 4]).tokens[1][0])
    assert both.tokens[2][1, 1].abs().sum() == 0
    with pytest.raises(TaskMismatchError):
        TaskEmbedding.concatenate([a, TaskEmbedding(b.tokens, b.classes, b.present, "another")])


def test_save_load_round_trip(net, tmp_path):
    image, masks = make_pair(3)
    with torch.no_grad():
        task = net.encode_task(image, masks, classes=[17, 53, 2035])
        task.save(tmp_path / "task.pt")
        loaded = TaskEmbedding.load(tmp_path / "task.pt", model=net)
        assert loaded.classes == [17, 53, 2035] and loaded.model_id == task.model_id == net.model_id()
        assert torch.equal(loaded.present, task.present)
        assert all(torch.equal(x, y) for x, y in zip(loaded.tokens, task.tokens))
        assert torch.equal(net(image, loaded), net(image, task))
    assert [p.name for p in tmp_path.iterdir()] == ["task.pt"]  # no temp file left behind
    assert loaded.decision_threshold is None and loaded.window_step is None  # not calibrated
    # a calibration recorded: one threshold per class value and the window step
    calibrated = dataclasses.replace(task, decision_threshold={17: 0.5, 53: 0.05, 2035: 0.2}, window_step=0.33)
    calibrated.save(tmp_path / "calibrated.pt")
    loaded = TaskEmbedding.load(tmp_path / "calibrated.pt")
    assert loaded.decision_threshold == {17: 0.5, 53: 0.05, 2035: 0.2} and loaded.window_step == 0.33
    with pytest.raises(ValueError, match="decision_threshold"):
        dataclasses.replace(task, decision_threshold={17: 1.5})
    with pytest.raises(ValueError, match="window_step"):
        dataclasses.replace(task, window_step=0)


def test_task_from_another_model_is_refused(net, tmp_path):
    other = make_net(seed=1)
    image, masks = make_pair(2)
    with torch.no_grad():
        task = other.encode_task(image, masks)
        task.save(tmp_path / "other.pt")
        with pytest.raises(TaskMismatchError, match=f"encoded by model {other.model_id()}, not by this model"):
            TaskEmbedding.load(tmp_path / "other.pt", model=net)
        with pytest.raises(TaskMismatchError):
            net(image, task)
        net.train()  # no check while training: weights change every step and tasks are re-encoded
        try:
            assert net(image, task).shape == (1, 2, *PATCH)
        finally:
            net.eval()
        wrong_shape = make_net(num_query_tokens=2)
        with pytest.raises(TaskMismatchError):
            wrong_shape(image, TaskEmbedding(task.tokens, task.classes, task.present, wrong_shape.model_id()))


def test_same_seed_same_output():
    image, masks = make_pair(3)
    outs, ids = [], []
    for seed in (0, 0, 1):
        net = make_net(seed)
        with torch.no_grad():
            outs.append(net(image, net.encode_task(image, masks)))
        ids.append(net.model_id())
    assert torch.equal(outs[0], outs[1]) and ids[0] == ids[1]
    assert ids[2] != ids[0] and not torch.allclose(outs[0], outs[2])


def test_model_id_is_cached_and_follows_the_weights():
    net = make_net()
    first = net.model_id()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with mock.patch("hashlib.sha256", side_effect=AssertionError("weights hashed again")):
        for _ in range(3):
            assert net.model_id() == first  # cached: unchanged weights are not hashed again
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    image, masks = make_pair(1)
    net.train()
    net(image, net.encode_task(image, masks)).mean().backward()
    opt.step()
    assert net.model_id() != first
    net.load_state_dict(saved)
    assert net.model_id() == first


def test_a_small_configuration_trains_on_cpu():
    """Its loss falls over a few steps on one batch (speed is benchmarks/model_speed.py's business); without the
    position prior, which would give the answer away here (query = reference)."""
    torch.manual_seed(0)
    net = make_net(deep_supervision=True, position_grid=0).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    image, masks = make_pair(4, batch=2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        outs = net(image, net.encode_task(image, masks))
        loss = F.binary_cross_entropy_with_logits(outs[0], masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_spatial_size_must_be_divisible(net):
    image, masks = make_pair(2)
    with torch.no_grad():
        task = net.encode_task(image, masks)
        with pytest.raises(ValueError, match="divisible by 16"):
            net(torch.randn(1, 1, 32, 32, 24), task)
        with pytest.raises(ValueError, match="divisible by 16"):
            net.encode_task(image[..., :20], masks[..., :20])
        with pytest.raises(ValueError, match="reference_masks"):
            net.encode_task(image, masks[..., :16])


def test_task_batch_broadcasts_over_queries(net):
    image, masks = make_pair(2)
    query = torch.randn(3, 1, *PATCH)
    with torch.no_grad():
        task = net.encode_task(image, masks)
        out = net(query, task)
        torch.testing.assert_close(out[1:2], net(query[1:2], task))
        with pytest.raises(TaskMismatchError):
            net(query[:2], TaskEmbedding.concatenate([task] * 3))


def test_task_tokens_attended_once_give_every_query_the_same_logits(net):
    """A sliding window computes the task-only first step of the decoding once per query, not per window."""
    image, masks = make_pair(3)
    with torch.no_grad():
        task = net.encode_task(image, masks)
        attended = net.attended_task_tokens(task)
        query = torch.randn(1, 1, *PATCH)
        assert torch.equal(net(query, task, attended_tokens=attended), net(query, task))
        queries = torch.randn(2, 1, *PATCH)
        torch.testing.assert_close(net(queries, task, attended_tokens=attended), net(queries, task))
        assert not torch.equal(net(query, task, attended_tokens=attended + 1), net(query, task))  # they are used
        with pytest.raises(TaskMismatchError, match="attended"):
            net(query, task.select([1, 2]), attended_tokens=attended)


def test_foreground_token_is_full_resolution_masked_average():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 4, 2, 8, generator=g)
    masks = (torch.rand(2, 3, 16, 8, 32, generator=g) > 0.95).float()
    masks[0, 0, 0, 0, 0] = 1  # a single voxel: vanishes at low resolution, not here
    up = F.interpolate(feats, size=masks.shape[2:], mode="trilinear", align_corners=False)
    explicit = torch.einsum("bcxyz,bkxyz->bkc", up, masks) / (masks.sum((2, 3, 4))[..., None] + 1e-6)
    torch.testing.assert_close(full_res_masked_average(feats, masks), explicit, atol=1e-5, rtol=1e-4)


def test_pixel_shuffle_3d():
    x = torch.randn(2, 3 * 8, 4, 5, 6)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 3, 8, 10, 12)
    assert y[1, 2, 2 * 3 + 1, 2 * 4 + 0, 2 * 5 + 1] == x[1, 2 * 8 + 1 * 4 + 0 * 2 + 1, 3, 4, 5]
    assert torch.equal(pixel_unshuffle_3d(y, 2), x)


def test_build_network_from_plans_entry():
    arch = {"network_class_name": "iris_nnu.model.network.IrisNetwork",
            "arch_kwargs": {**TINY, "num_classes": 7, "features_per_stage": [4, 8, 16]},
            "_kw_requires_import": []}
    net = build_network(arch, input_channels=2, deep_supervision=True)
    assert isinstance(net, IrisNetwork) and net.deep_supervision and net.input_channels == 2
    assert sum(p.numel() for p in net.parameters()) == count_parameters(arch["arch_kwargs"], 2)
    with pytest.raises(ImportError):
        build_network({**arch, "network_class_name": "iris_nnu.model.network.NoSuchNet"}, 1)
    net.apply(net.initialize)  # nnU-Net does this when present; must leave a working network
    image = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(net(image, net.encode_task(image, torch.ones(1, 1, 8, 8, 8)))[0]).all()


@pytest.mark.parametrize("kw", [
    {}, dict(features_per_stage=(16, 32, 64, 128, 256)), TINY, dict(features_per_stage=(8, 16)),
    dict(features_per_stage=(6, 12, 24), blocks_per_stage=(3, 1, 2), task_scales=3, num_query_tokens=4,
         attention_heads=5, attention_depth=2), dict(TINY, position_grid=16)])
def test_count_parameters_is_exact(kw):
    """For the network a plans entry builds (count_parameters serves the planner)."""
    arch = {"network_class_name": "iris_nnu.model.network.IrisNetwork", "arch_kwargs": kw}
    assert count_parameters(kw, 1) == sum(p.numel() for p in build_network(arch, 1).parameters())


def test_architecture_round_trips_plans_kwargs():
    arch = IrisArchitecture.from_kwargs({**TINY, "num_classes": 3})  # nnU-Net's num_classes is accepted, ignored
    assert arch.to_kwargs() == {**IrisArchitecture().to_kwargs(), **TINY, "features_per_stage": [4, 8, 16, 32, 64],
                                "position_grid": 0}  # plans without it predate position priors
    assert IrisArchitecture.from_kwargs(arch.to_kwargs()) == arch
    assert (arch.blocks, arch.levels) == ([1] * 5, [4, 3, 2])
    with pytest.raises(ValueError, match="'widths'"):
        IrisArchitecture.from_kwargs({"widths": [8, 16]})


def test_memory_estimate_is_arithmetic_and_monotone():
    kw = dict(features_per_stage=(16, 32, 64, 128, 256))
    with mock.patch.object(IrisNetwork, "__init__", side_effect=AssertionError("a network was built")):
        base = estimate_memory_bytes(kw, (64, 64, 64), 2, 4)  # the planner calls it thousands of times
    assert estimate_memory_bytes(kw, (64, 64, 64), 2, 8) > base
    assert estimate_memory_bytes(kw, (96, 64, 64), 2, 4) > base
    assert estimate_memory_bytes(kw, (64, 64, 64), 4, 4) > 1.5 * base
    assert estimate_memory_bytes(kw, (64, 64, 64), 2, 4, training=False) < base
    assert estimate_memory_bytes({}, (128, 128, 128), 2, 4) > 4 * estimate_memory_bytes(kw, (64, 64, 64), 2, 4)


def test_dependencies_point_one_way():
    """inference/ never imports trainers/; model/ is pure torch (no nnunetv2, no pipeline stage)."""
    import subprocess
    import sys

    check = ("import sys, iris_nnu.inference; assert 'iris_nnu.trainers' not in sys.modules; "
             "[sys.modules.pop(m) for m in list(sys.modules) if m.startswith(('iris_nnu', 'nnunetv2'))]; "
             "import iris_nnu.model; loaded = [m for m in sys.modules if m.startswith(('nnunetv2', "
             "'iris_nnu.inference', 'iris_nnu.trainers', 'iris_nnu.preprocessing'))]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", check], check=True)


# ------------------------------------------------------------------------------------------ position prior
def test_position_prior_marks_where_the_class_lies():
    from iris_nnu.model.position import ScanFrame, position_prior, sample_prior, scan_coordinates

    masks = torch.zeros(1, 2, 40, 24, 32)
    masks[0, 0, 2:8, 2:6, 3:9] = 1  # a corner
    masks[0, 1, 30:38, 16:22, 20:30] = 1  # the opposite corner
    prior = position_prior(masks, grid=8)
    assert prior.shape == (1, 2, 8, 8, 8) and prior.flatten(2).amax(2).allclose(torch.ones(1, 2))
    coordinates = scan_coordinates(masks.shape[2:])[None]
    sampled = sample_prior(prior, coordinates)  # (1, 2, 40, 24, 32)
    inside0, inside1 = masks[0, 0] > 0, masks[0, 1] > 0
    assert sampled[0, 0][inside0].mean() > 0.5 > 0.05 > sampled[0, 0][inside1].max()
    assert sampled[0, 1][inside1].mean() > 0.5 > 0.05 > sampled[0, 1][inside0].max()
    # a window's coordinates are the scan's, cut where the window lies (also partly outside the scan)
    frame = ScanFrame.box(masks.shape[2:])
    window = frame.coordinates((4, -3, 10), (16, 16, 16))
    torch.testing.assert_close(window[:, :, 3:, :], coordinates[0, :, 4:20, 0:13, 10:26])
    assert not position_prior(torch.zeros(1, 1, 8, 8, 8), grid=4).any()  # an empty mask places nothing


def test_prior_sampled_on_the_cpu_equals_grid_sample():
    """The CPU's sparse-matrix trilinear sampling is grid_sample's (zeros off the grid, align_corners=False), also
    for points on the grid's edge, beyond it, infinite, and for one prior shared by a batch."""
    from iris_nnu.model.position import sample_prior

    torch.manual_seed(0)
    prior = torch.rand(2, 5, 6, 7, 8)
    coordinates = torch.rand(2, 3, 9, 10, 11) * 3 - 1.5
    coordinates[0, :, 0, 0, 0] = torch.tensor([1 + 2 / 6, 1 + 1 / 7, 1 + 2 / 8])  # 1-1.5 cells past the last centres
    coordinates[0, :, 1, 0, 0] = torch.tensor([-1 + 1 / 6, -1 + 1 / 7, 1 - 1 / 8])  # on the first / last centres
    coordinates[1, 0, 2, 0, 0], coordinates[1, 1, 3, 0, 0] = float("inf"), -float("inf")
    grid = coordinates.flip(1).permute(0, 2, 3, 4, 1)
    for priors in (prior, prior[:1]):
        expected = F.grid_sample(priors.expand(2, -1, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
        sampled = sample_prior(priors, coordinates)
        assert sampled.shape == expected.shape
        torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-6)
    assert 0 < sampled[0, :, 1, 0, 0].min() and not sampled[0, :, 0, 0, 0].any()


def test_scan_frames_give_the_same_place_the_same_coordinates():
    """Two bodies of different size, position and tilt in their scans: a structure at the same place of each body
    gets the same frame coordinates (so one reference's prior lands on the other's structure)."""
    from iris_nnu.model.position import ScanFrame, position_prior_from_labels, sample_prior

    def scan(centre, radii, degrees, shape=(64, 72, 60)):
        x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
        a = math.radians(degrees)
        rotation = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]],
                                dtype=torch.float64)
        local = (x - torch.tensor(centre, dtype=torch.float64)) @ rotation  # body axes
        body = ((local / torch.tensor(radii, dtype=torch.float64)) ** 2).sum(-1) < 1
        spot = ((((local - torch.tensor(radii, dtype=torch.float64) * torch.tensor([0.5, -0.3, 0.2]))
                  / torch.tensor(radii, dtype=torch.float64) / 0.2) ** 2).sum(-1) < 1) & body
        return body, spot

    body_a, spot_a = scan((30, 36, 30), (22.0, 28.0, 18.0), 0)
    body_b, spot_b = scan((34, 33, 28), (18.0, 24.0, 16.0), 15)
    frame_a, frame_b = ScanFrame.of(body_a), ScanFrame.of(body_b)
    prior = position_prior_from_labels(spot_a.long(), [1], 16, frame_a)[None]
    on_b = sample_prior(prior, frame_b.coordinates((0, 0, 0), body_b.shape)[None])[0, 0]
    box_b = sample_prior(prior, ScanFrame.box(body_b.shape).coordinates((0, 0, 0), body_b.shape)[None])[0, 0]
    assert on_b[spot_b].mean() > 0.6 and on_b[body_b & ~spot_b].mean() < 0.1, (on_b[spot_b].mean(), )
    assert on_b[spot_b].mean() > box_b[spot_b].mean() + 0.3  # the scans' boxes alone put it elsewhere
    # a round body has no principal axes: the frame keeps the scan's
    round_body = scan((30, 36, 30), (20.0, 20.0, 20.0), 0)[0]
    assert abs(ScanFrame.of(round_body).axes[0][1]) < 1e-9


def test_position_prior_lowers_logits_away_from_the_reference_structure(net):
    from iris_nnu.model.position import ScanFrame, scan_coordinates

    image, masks = make_pair(1)
    masks = torch.zeros_like(masks)
    masks[0, 0, :8, :8, :8] = 1  # the reference structure in one corner of its scan
    query = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        task = net.encode_task(image, masks)
        assert task.positions is not None and task.positions.shape == (1, 1, 32, 32, 32)
        with_prior = net(query, task)
        without = net(query, TaskEmbedding(task.tokens, task.classes, task.present, task.model_id))
        weight = float(F.softplus(net.position_weight))
        change = with_prior - without
        # at the reference structure the logits barely move (the prior is near its peak 1), far from it they drop
        assert change[0, 0, :8, :8, :8].max() > weight * math.log(0.8)
        assert change[0, 0, :8, :8, :8].mean() > 0.5 * weight * math.log(0.01) / 4
        torch.testing.assert_close(change[0, 0, 24:, 24:, 24:], torch.full((8, 8, 8), weight * math.log(0.01)))
        # the default coordinates are the query's own extent; a window elsewhere in a larger scan moves the prior
        torch.testing.assert_close(net(query, task, scan_coordinates(PATCH)[None]), with_prior)
        far = net(query, task, ScanFrame.box((64, 64, 64)).coordinates((32, 32, 32), PATCH)[None])
        assert (far - without)[0, 0, :4, :4, :4].max() < weight * math.log(0.02)
        with pytest.raises(ValueError, match="coordinates"):
            net(query, task, scan_coordinates((16, 16, 16))[None])
    assert make_net(position_grid=0).encode_task(image, masks).positions is None


def test_task_positions_survive_mean_select_concatenate_and_files(net, tmp_path):
    image, masks = make_pair(3, batch=2)
    with torch.no_grad():
        task = net.encode_task(image, masks, classes=[5, 7, 9])
    masks_b = masks.clone()
    masks_b[1, 1] = 0  # class 7 absent from reference 1: the ensemble's prior is reference 0's
    with torch.no_grad():
        partial = net.encode_task(image, masks_b, classes=[5, 7, 9])
    torch.testing.assert_close(partial.mean().positions[0, 1], partial.positions[0, 1])
    torch.testing.assert_close(task.mean().positions[0], task.positions.mean(0))
    torch.testing.assert_close(task.select([9, 5]).positions, task.positions[:, [2, 0]])
    both = TaskEmbedding.concatenate([task.select([5]), task.select([7])])
    torch.testing.assert_close(both.positions[:2, 0], task.positions[:, 0])
    assert not both.positions[:2, 1].any()  # class 7 is absent from the first task
    task.save(tmp_path / "t.pt")
    torch.testing.assert_close(TaskEmbedding.load(tmp_path / "t.pt", net).positions, task.positions)


def test_mirrored_tokens_follow_the_tokens_through_mean_select_concatenate_and_files(net, tmp_path):
    """Mirrored TTA's tokens (per flip, of the references flipped) are averaged, subset and stored like the tokens."""
    image, masks = make_pair(3, batch=2)
    with torch.no_grad():
        plain = net.encode_task(image, masks, classes=[5, 7, 9])
        flipped = net.encode_task(image.flip(2), masks.flip(2), classes=[5, 7, 9])
    task = dataclasses.replace(plain, mirrored={(0,): flipped.tokens})
    assert all(torch.equal(a, b) for a, b in zip(task.flipped((0,)).tokens, flipped.tokens))
    assert all(not torch.equal(a, b) for a, b in zip(flipped.tokens, plain.tokens))  # flipping changes tokens
    for derived, expected in ((task.mean(), flipped.mean()), (task.select([9, 5]), flipped.select([9, 5])),
                              (TaskEmbedding.concatenate([task.select([5]), task.select([7, 9])]),
                               TaskEmbedding.concatenate([flipped.select([5]), flipped.select([7, 9])]))):
        assert all(torch.equal(a, b) for a, b in zip(derived.flipped((0,)).tokens, expected.tokens))
    task.save(tmp_path / "t.pt")
    loaded = TaskEmbedding.load(tmp_path / "t.pt", net)
    assert all(torch.equal(a, b) for a, b in zip(loaded.flipped((0,)).tokens, flipped.tokens))
    with pytest.raises(KeyError, match=r"\(1,\)"):
        task.flipped((1,))
    with pytest.raises(TaskMismatchError, match="mirrored"):
        TaskEmbedding.concatenate([task, plain])


def test_plans_without_position_grid_build_a_model_without_one():
    """Plans and model folders written before position priors keep their architecture."""
    arch = {"network_class_name": "iris_nnu.model.network.IrisNetwork", "arch_kwargs": dict(TINY)}
    assert build_network(arch, 1).position_grid == 0 and not hasattr(build_network(arch, 1), "position_weight")
    assert build_network({**arch, "arch_kwargs": {**TINY, "position_grid": 16}}, 1).position_grid == 16
