"""The sliding window and the Segmenter: nnU-Net's arithmetic bit for bit, the task and the frame as arguments."""
from __future__ import annotations

import contextlib
import dataclasses
import io
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from iris_nnu.errors import IrisInputError
from iris_nnu.inference import segmenter
from iris_nnu.inference.segmenter import LOGIT_LIMIT, Segmenter, window_precision
from iris_nnu.model import IrisNetwork
from iris_nnu.model.position import ScanFrame

TINY = dict(features_per_stage=(4, 8, 16, 32, 64), blocks_per_stage=1, num_query_tokens=3, attention_heads=2)
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def network_and_task():
    torch.manual_seed(0)
    network = IrisNetwork(input_channels=1, **TINY).eval()
    reference = torch.randn(1, 1, *PATCH)
    masks = torch.zeros(1, 3, *PATCH)
    masks[0, 0, 4:14, 4:20, 6:16] = 1
    masks[0, 1, 16:28, 8:24, 10:30] = 1
    masks[0, 2, 2:30, 20:30, 2:12] = 1
    with torch.no_grad():
        task = network.encode_task(reference, masks, classes=[1, 2, 5])
    return network, task


def _nnunet_logits(network, task, image, frame, step_size):
    """What the previous IrisPredictor did: nnU-Net's own sliding window over the image with the scan coordinates
    as 3 extra channels, the network called with the task by a wrapper."""
    class Wrapped(torch.nn.Module):
        def forward(self, x):
            return network(x[:, :1], task, x[:, 1:]).clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"))
    predictor.network = Wrapped()
    predictor.configuration_manager = SimpleNamespace(patch_size=list(PATCH))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=task.num_classes)
    with_coordinates = torch.cat([image, frame.coordinates((0, 0, 0), image.shape[1:])])
    return predictor.predict_sliding_window_return_logits(with_coordinates)


def _task_without_prior(task):
    return dataclasses.replace(task, positions=None)


@pytest.mark.parametrize("shape,step", [((45, 38, 52), 0.5), ((24, 40, 30), 0.35)])  # the second is padded
def test_the_sliding_window_is_nnunets_bit_for_bit(network_and_task, shape, step):
    network, task = network_and_task
    task = _task_without_prior(task)
    torch.manual_seed(1)
    image = torch.randn(1, *shape)
    frame = ScanFrame.box(shape)
    expected = _nnunet_logits(network, task, image, frame, step)
    got = Segmenter([network], PATCH, step, precision="float32").logits(image, [task], frame)
    assert got.dtype == torch.half and got.shape == (3, *shape)
    assert torch.equal(got, expected)
    # classes picked by value: the task's selection (decoded together, so not the rows of the 3-class map)
    assert torch.equal(Segmenter([network], PATCH, step, precision="float32").logits(image, [task], frame,
                                                                                     classes=[5, 1]),
                       _nnunet_logits(network, task.select([5, 1]), image, frame, step))


def test_the_prior_added_once_per_voxel_equals_adding_it_in_every_window(network_and_task):
    """The previous predictor added the prior inside each window (nnU-Net's window, coordinates as channels); its
    term depends on the voxel alone, so adding it after the windows' mean changes only fp16 rounding."""
    network, task = network_and_task
    shape = (45, 38, 52)
    torch.manual_seed(1)
    image = torch.randn(1, *shape)
    frame = ScanFrame.box(shape)
    per_window = _nnunet_logits(network, task, image, frame, 0.5).float()
    got = Segmenter([network], PATCH, precision="float32").logits(image, [task], frame).float()
    inside = (slice(None), *(slice(6, -6),) * 3)  # at the image's rim fp16 Gaussian weights round the old sums coarsely
    assert (got - per_window)[inside].abs().max() < 0.05
    assert (got - per_window).abs().mean() < 0.01
    assert ((got > 0) == (per_window > 0)).float().mean() > 0.998
    without = Segmenter([network], PATCH, precision="float32").logits(image, [_task_without_prior(task)],
                                                                      frame).float()
    assert (got - without).abs().mean() > 0.5  # the prior does change the logits


def test_the_window_forward_gets_the_task_and_the_prior_the_frame(network_and_task, monkeypatch):
    network, task = network_and_task
    shape = (40, 36, 44)
    frame = ScanFrame(centre=(18.0, 20.0, 24.0), axes=((0.0, 0.1, 0.0), (0.08, 0.0, 0.0), (0.0, 0.0, 0.09)))
    windows, terms = [], []
    forward, position_logits = IrisNetwork.forward, IrisNetwork.position_logits

    def spy_forward(self, query, window_task, coordinates=None, **kwargs):
        assert window_task is not None and window_task.tokens[0].shape[1] == 3
        windows.append(query.shape)
        return forward(self, query, window_task, coordinates, **kwargs)

    def spy_position(self, positions, coordinates):
        terms.append(coordinates)
        return position_logits(self, positions, coordinates)

    monkeypatch.setattr(IrisNetwork, "forward", spy_forward)
    monkeypatch.setattr(IrisNetwork, "position_logits", spy_position)
    Segmenter([network], PATCH).logits(torch.randn(1, *shape), [task], frame)
    assert len(windows) == 8  # 2 x 2 x 2 windows, each with the task
    torch.testing.assert_close(torch.cat(terms, 2)[0], frame.coordinates((0, 0, 0), shape))  # every voxel, this frame
    with pytest.raises(ValueError, match="scan frame"):
        Segmenter([network], PATCH).logits(torch.randn(1, *shape), [task], None)


def test_windows_over_a_box_run_there_alone_and_leave_the_rest_background(network_and_task):
    """A CT's body box (plans.BODY_BOX_KEY): the windows cover the box widened to the patch, the prior reads the
    scan's own coordinates there, and every class is -LOGIT_LIMIT outside."""
    network, task = network_and_task
    shape = (70, 40, 56)
    torch.manual_seed(2)
    image = torch.randn(1, *shape)
    axes = ((0.05, 0.0, 0.0), (0.0, 0.08, 0.0), (0.0, 0.0, 0.06))
    frame = ScanFrame(centre=(30.0, 20.0, 25.0), axes=axes)
    segmenter = Segmenter([network], PATCH, precision="float32")
    box = [[10, 50], [12, 20], [-3, 60]]
    # y: 8 voxels widened to the patch about their centre, stopped by the scan's edge; z: clipped to the scan
    region = segmenter.window_region(shape, box)
    assert region == (slice(10, 50), slice(0, 32), slice(0, 56))
    assert segmenter.window_region(shape, [[64, 70], [30, 40], [20, 21]]) == (slice(38, 70), slice(8, 40),
                                                                              slice(5, 37))
    assert segmenter.window_region(shape, None) == tuple(slice(0, n) for n in shape)
    got = segmenter.logits(image, [task], frame, box=box)
    assert got.shape == (3, *shape)
    # the region alone, its frame moved by the region's corner: the same windows and the same prior
    moved = ScanFrame(centre=(30.0 - 10, 20.0, 25.0), axes=axes)
    assert torch.equal(got[(slice(None), *region)], segmenter.logits(image[(slice(None), *region)], [task], moved))
    outside = torch.ones(shape, dtype=torch.bool)
    outside[region] = False
    assert (got[:, outside] == -LOGIT_LIMIT).all()
    whole = segmenter.logits(image, [task], frame)
    assert not torch.equal(got, whole) and (whole[:, outside] > -LOGIT_LIMIT).any()


def test_a_task_checked_once_per_query_not_per_window(network_and_task, monkeypatch):
    network, task = network_and_task
    calls = []
    model_id = IrisNetwork.model_id
    monkeypatch.setattr(IrisNetwork, "model_id", lambda self: calls.append(1) or model_id(self))
    Segmenter([network], PATCH).logits(torch.randn(1, 40, 36, 44), [task], ScanFrame.box((40, 36, 44)))
    assert len(calls) == 1


def test_mirrored_tta_needs_the_tasks_flipped_tokens(network_and_task):
    network, task = network_and_task
    with pytest.raises(IrisInputError, match="flipped"):
        Segmenter([network], PATCH, mirror_axes=(0, 1, 2)).logits(torch.randn(1, *PATCH), [task],
                                                                  ScanFrame.box(PATCH))


def test_precision_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(segmenter, "cpu_has_native_bfloat16", lambda: True)
    assert window_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(segmenter, "cpu_has_native_bfloat16", lambda: False)
    assert window_precision("auto", "cpu") == "float32"
    assert window_precision("bfloat16", "cpu") == "bfloat16"  # asked for: used, even where emulated
    assert window_precision("float32", "cuda") == "float16"  # CUDA: nnU-Net's float16 autocast, whatever is asked
    assert window_precision("bfloat16", "mps") == "float32"  # other devices: no autocast, as before
    with pytest.raises(ValueError, match="precision must be one of"):
        Segmenter([], PATCH, precision="half")


def test_bfloat16_windows_run_in_bfloat16_and_agree_with_float32(network_and_task):
    network, task = network_and_task
    shape = (45, 38, 52)
    torch.manual_seed(1)
    image = torch.randn(1, *shape)
    frame = ScanFrame.box(shape)
    seen = []
    hook = network.encoder.register_forward_hook(lambda module, inputs, output: seen.append(output[0].dtype))
    try:
        exact = Segmenter([network], PATCH, precision="float32").logits(image, [task], frame).float()
        assert set(seen) == {torch.float32}
        seen.clear()
        fast = Segmenter([network], PATCH, precision="bfloat16").logits(image, [task], frame).float()
        assert set(seen) == {torch.bfloat16}  # the convolutions really ran in bfloat16
    finally:
        hook.remove()
    assert fast.dtype == exact.dtype and fast.shape == exact.shape
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().mean() < 0.05 * exact.abs().mean()
    assert ((fast > 0) == (exact > 0)).float().mean() > 0.99
