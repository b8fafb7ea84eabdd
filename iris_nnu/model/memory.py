"""Pure-arithmetic parameter count and peak-memory estimate of IrisNetwork, for the planner.

This module uses no torch (importing it through `iris_nnu.model` still loads the network, and torch).
"""
from __future__ import annotations

from math import prod
from typing import Any, Mapping, Sequence

from .architecture import CHUNK_ELEMENTS, FUSE_CHANNELS, MLP_RATIO, IrisArchitecture

# Calibration (CPU, torch 2.13, 2 threads): peak RSS growth of a fresh process (code paths warmed first) over two
# training steps (reference encode + query forward/backward with deep supervision, Dice+BCE, Adam), and over one
# eval encode + query pass in inference_mode; 11 configurations: widths 4..64 to 32..512, 3-5 stages, patches
# 32^3..96x64x64, B 1-4, K 1-16. The three constants below were fitted by least squares on relative error.
# estimate/measured, training: 0.87-1.16 (e.g. widths 16..256, 64^3, B2, K4: 1792 vs 1757 MiB; widths 32..512,
# 64^3, B1, K4: 2379 vs 2207 MiB), 0.75 for widths 4..64 (oneDNN pads 4-channel maps to 16); inference: 0.86-1.24.
# On a GPU with AMP the activations are partly fp16, so there the estimate errs on the safe side.
ACT_SCALE = 0.93  # measured / counted elements kept for backward
RUNTIME_BYTES = 300 * 2**20  # allocator, oneDNN scratchpads and autograd bookkeeping, measured as a constant
INFER_SCALE = 1.05


def _architecture(arch: Mapping[str, Any] | IrisArchitecture) -> IrisArchitecture:
    return arch if isinstance(arch, IrisArchitecture) else IrisArchitecture.from_kwargs(arch)


def count_parameters(arch_kwargs: Mapping[str, Any] | IrisArchitecture, input_channels: int = 1) -> int:
    """Exact number of parameters of IrisNetwork(input_channels, **arch_kwargs) (a test checks this)."""
    arch = _architecture(arch_kwargs)
    f, blocks, levels = arch.features_per_stage, arch.blocks, arch.levels
    m, depth = arch.num_query_tokens, arch.attention_depth
    n = len(f) - 1

    def conv_in(ci: int, co: int, k: int = 27) -> int:  # bias-free conv + affine InstanceNorm
        return k * ci * co + 2 * co

    def linear(ci: int, co: int) -> int:
        return ci * co + co

    def attention(d: int) -> int:
        return 4 * linear(d, d)

    def mlp(d: int, out: int, hidden: int) -> int:
        return linear(d, hidden) + linear(hidden, out)

    def res_block(ci: int, co: int, project: bool = True) -> int:
        return conv_in(ci, co) + conv_in(co, co) + (conv_in(ci, co, 1) if ci != co and project else 0)

    total = conv_in(input_channels, f[0])
    for s in range(n + 1):
        total += sum(res_block(f[max(s - 1, 0)] if i == 0 else f[s], f[s]) for i in range(blocks[s]))
    for s in range(n):
        total += f[s + 1] * f[s] + res_block(2 * f[s], f[s], project=False)
    for s in levels:
        d, r3, c = f[s], 8**s, FUSE_CHANNELS
        total += depth * (3 * attention(d) + mlp(d, d, MLP_RATIO * d) + 5 * 2 * d)  # two-way layers
        total += linear(d, r3 * c) + 27 * (c + 1) * c + c + linear(r3 * c, d)  # mask fusion (convs with bias)
        total += m * d + 2 * attention(d) + mlp(d, d, MLP_RATIO * d) + 4 * 2 * d  # context queries
    total += sum(linear(f[s + 1], f[s]) for s in levels[1:])  # token carry between levels
    c_last = f[levels[-1]]
    c_head = c_last + sum(f[s] for s in levels)  # decoded token + the class's reference tokens of every scale
    total += 2 * c_head + mlp(c_head, f[0], c_last)  # class head
    total += sum(linear(f[0], f[s]) for s in range(1, n)) + 1  # deep-supervision heads, logit bias
    return total + (1 if arch.position_grid else 0)  # position weight


def _activation_elements(arch: IrisArchitecture, p: int, k: int, input_channels: int) -> float:
    """Elements kept for backward in one training step, for batch 1."""
    f, blocks, levels = arch.features_per_stage, arch.blocks, arch.levels
    m, depth = arch.num_query_tokens, arch.attention_depth
    n = [p / 8**s for s in range(len(f))]  # voxels per level
    enc = 2 * f[0] * n[0]  # stem: conv output (kept by the norm) and activation
    for s in range(len(f)):
        if s:
            enc += 3 * f[s - 1] * n[s]  # max-pool output + int64 indices
        enc += 4 * f[s] * n[s] * blocks[s] + (2 * f[s] * n[s] if s and f[s] != f[s - 1] else 0)

    def dec(stop: int) -> float:  # concat + 4 block tensors per level
        return sum(6 * f[s] * n[s] for s in range(stop, len(f) - 1))

    interact = sum(9 * depth * f[s] * n[s] + 6 * depth * k * (m + 1) * f[s] for s in levels)
    context = sum(2 * p + k * (2 * p + 5 * f[s] * n[s] + 6 * m * f[s]) for s in levels)
    heads = 5 * k * p * 8 / 7  # logits, sigmoid, loss terms and targets, deep-supervision levels included
    inputs = 2 * input_channels * p + k * p  # query, reference, reference masks
    return 2 * enc + dec(0) + dec(levels[-1]) + interact + context + heads + inputs


def estimate_memory_bytes(arch_kwargs: Mapping[str, Any] | IrisArchitecture, patch_size: Sequence[int],
                          batch_size: int, num_classes: int, input_channels: int = 1, training: bool = True) -> int:
    """Peak memory (bytes, fp32) of one training step: reference encode + query forward/backward + Adam.

    With training=False: one inference pass (encode or query, whichever is larger), weights only."""
    arch = _architecture(arch_kwargs)
    f, levels = arch.features_per_stage, arch.levels
    p, b, k = prod(int(v) for v in patch_size), int(batch_size), int(num_classes)
    params = count_parameters(arch, input_channels)
    if training:
        act = _activation_elements(arch, p, k, input_channels)
        # weights, gradients and two Adam moments (fp32) + activations kept for backward
        return int(16 * params + 4 * b * ACT_SCALE * act + RUNTIME_BYTES)
    skips = sum(c * p / 8**s for s, c in enumerate(f))
    query = skips + 4 * f[0] * p + 2 * k * p + input_channels * p
    chunk = max(1, min(k, CHUNK_ELEMENTS // max(1, b * p)))  # classes per chunk in the context encoder
    encode = skips + max(3 * chunk * p + 4 * chunk * f[s] * p / 8**s for s in levels) + k * p
    padded = 2 * max(f[0], 16) * p  # transient copies in oneDNN's blocked layout (channels padded to 16)
    return int(4 * params + 4 * b * (INFER_SCALE * max(query, encode) + padded))
