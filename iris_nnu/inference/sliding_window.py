"""A sliding window whose forward function is an argument: nnU-Net's Gaussian-weighted window on its public helpers.

nnU-Net's `nnUNetPredictor.predict_sliding_window_return_logits` calls `self.network(window)` and reads the number
of outputs from `self.label_manager`: an Iris window also needs the task and where the window lies in the scan, which
would have to travel as predictor state. Here the caller passes `forward(window, where)`, so the task and the scan
frame are the forward's own arguments (see segmenter.py). The arithmetic is nnU-Net's (fp16 sums of
Gaussian-weighted logits, divided by the summed weights), so results match it bit for bit.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from tqdm import tqdm

# forward(window (1, C, *patch) on the compute device, where (the window's slices of the padded image)) -> logits
# (1, K, *patch)
WindowForward = Callable[[torch.Tensor, tuple[slice, ...]], torch.Tensor]


def window_slices(shape: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[tuple[slice, ...]]:
    """The windows of nnU-Net's sliding window over an image of `shape` (at least the patch size per axis)."""
    steps = compute_steps_for_sliding_window(tuple(shape), tuple(patch_size), step_size)
    return [tuple(slice(s, s + p) for s, p in zip(lower, patch_size)) for lower in itertools.product(*steps)]


def pad_to_patch(image: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(C, X, Y, Z) zero-padded to at least the patch size (nnU-Net's pad_nd_image), and the slices that undo it."""
    padded, revert = pad_nd_image(image, tuple(patch_size), "constant", {"value": 0}, True, None)
    return padded, tuple(revert[1:])


@torch.inference_mode()
def sliding_window_logits(image: torch.Tensor, num_outputs: int, patch_size: Sequence[int], step_size: float,
                          forward: WindowForward, device: torch.device | str = "cpu",
                          results_device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Gaussian-weighted mean of `forward`'s logits over overlapping windows of `image` (C, X, Y, Z): (K, X, Y, Z)
    fp16 on `results_device`. `image` is padded to the patch size first; `forward` sees the padded image's slices."""
    padded, revert = pad_to_patch(image, patch_size)
    padded = padded.to(results_device)
    windows = window_slices(padded.shape[1:], patch_size, step_size)
    logits = torch.zeros((num_outputs, *padded.shape[1:]), dtype=torch.half, device=results_device)
    weights = torch.zeros(padded.shape[1:], dtype=torch.half, device=results_device)
    gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1. / 8, value_scaling_factor=10, device=results_device)
    for where in tqdm(windows, desc="windows", unit="window", disable=not progress, leave=False):
        window = torch.clone(padded[(slice(None), *where)][None], memory_format=torch.contiguous_format).to(device)
        prediction = forward(window, where)[0].to(results_device)
        prediction *= gaussian
        logits[(slice(None), *where)] += prediction
        weights[where] += gaussian
    torch.div(logits, weights, out=logits)
    if torch.any(torch.isinf(logits)):
        raise RuntimeError("inf in the summed window logits (fp16): clamp the forward's logits")
    return logits[(slice(None), *revert)]
