"""Tests of the Iris network (iris_nnu.model) on tiny CPU configurations."""
from __future__ import annotations

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
    """Its loss falls over a few steps on one batch (speed is benchmarks/model_speed.py's business)."""
    torch.manual_seed(0)
    net = make_net(deep_supervision=True).train()
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
         attention_heads=5, attention_depth=2)])
def test_count_parameters_is_exact(kw):
    assert count_parameters(kw, 1) == sum(p.numel() for p in IrisNetwork(1, **kw).parameters())


def test_architecture_round_trips_plans_kwargs():
    arch = IrisArchitecture.from_kwargs({**TINY, "num_classes": 3})  # nnU-Net's num_classes is accepted, ignored
    assert arch.to_kwargs() == {**IrisArchitecture().to_kwargs(), **TINY, "features_per_stage": [4, 8, 16, 32, 64]}
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
