"""Iris (Gao et al., CVPR 2025, "Show and Segment") in pure PyTorch.

A 3D residual U-Net is shared by reference and query. `encode_task` turns a reference image and K binary masks
into per-class tokens (one foreground token + m context tokens) at the decoder scales nearest the bottleneck;
`forward` decodes a query for all K classes in one pass: the K(m+1) tokens and the query features interact by
self-attention and bidirectional cross-attention, and each class's vector is dotted with the final features.
Ours, not the paper's: a task also carries where each class lies in its reference scan, and the logits get
`w * log(prior)` at each query voxel's scan coordinates (position.py says why).
"""
from __future__ import annotations

import hashlib
import importlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architecture import CHUNK_ELEMENTS, FUSE_CHANNELS, MLP_RATIO, IrisArchitecture
from .ops import Conv3d, attention_heads_for, full_res_masked_average, pixel_shuffle_3d, pixel_unshuffle_3d
from .position import POSITION_FLOOR, position_prior, sample_prior, scan_coordinates
from .task import TRAINING_MODEL_ID, TaskEmbedding, TaskMismatchError


# ------------------------------------------------------------------------------------------ conv blocks
def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv3d:
    return Conv3d(cin, cout, k, padding=k // 2, bias=False)  # InstanceNorm follows: a bias would cancel


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(_conv(cin, cout), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class ResBlock(nn.Module):
    """(conv-IN-LeakyReLU, conv-IN) + skip (1x1x1 conv-IN when channels change), then LeakyReLU.

    With project_skip=False the caller passes the shortcut (the decoder passes its up-sampled path)."""

    def __init__(self, cin: int, cout: int, project_skip: bool = True):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout)
        self.conv2 = nn.Sequential(_conv(cout, cout), nn.InstanceNorm3d(cout, affine=True))
        self.skip = nn.Identity() if cin == cout or not project_skip else nn.Sequential(
            _conv(cin, cout, 1), nn.InstanceNorm3d(cout, affine=True))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + (self.skip(x) if shortcut is None else shortcut))


class Encoder(nn.Module):
    def __init__(self, cin: int, features: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        self.stem = ConvNormAct(cin, features[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResBlock(features[max(s - 1, 0)] if i == 0 else f, f) for i in range(blocks[s])])
            for s, f in enumerate(features))

    def forward(self, x: Tensor) -> list[Tensor]:
        skips, x = [], self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(F.max_pool3d(x, 2) if s else x)
            skips.append(x)
        return skips


# -------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def _mlp(dim: int, out: int | None = None, hidden: int | None = None) -> nn.Sequential:
    hidden = hidden or MLP_RATIO * dim
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class TwoWayLayer(nn.Module):
    """Tokens: self-attention, cross-attention to the image, MLP; image: cross-attention to the tokens.

    Pre-norm residuals; no positional encoding over tokens, so the layer is equivariant to permuting classes."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(5))
        self.self_attn, self.t2i, self.i2t = Attention(dim, heads), Attention(dim, heads), Attention(dim, heads)
        self.mlp = _mlp(dim)

    def attend_tokens(self, t: Tensor) -> Tensor:
        """The tokens' self-attention, the first step of `forward`."""
        x = self.norms[0](t)
        return t + self.self_attn(x, x)

    def forward(self, t: Tensor, img: Tensor, tokens_attended: bool = False) -> tuple[Tensor, Tensor]:
        """`tokens_attended`: `t` already went through `attend_tokens`."""
        n = self.norms
        if not tokens_attended:
            t = self.attend_tokens(t)
        img_n = n[1](img)
        t = t + self.t2i(n[2](t), img_n)
        t = t + self.mlp(n[3](t))
        return t, img + self.i2t(img_n, n[4](t))


class ContextEncoder(nn.Module):
    """m learnable queries attend to the level-s reference features fused with a class mask at full resolution.

    Fusion (method, MASS code): 1x1x1 conv C -> r^3 channels, pixel-shuffle to full resolution, concat the mask,
    conv, pixel-unshuffle, 1x1x1 conv back to C, plus the features as residual."""

    def __init__(self, dim: int, level: int, num_queries: int, heads: int):
        super().__init__()
        self.r, c = 2**level, FUSE_CHANNELS
        self.down = Conv3d(dim, c * self.r**3, 1)
        # conv(concat(features, mask)) split as conv(features) + conv(mask): the feature half is computed once per
        # reference, not once per class, and no (B*K, c+1, X, Y, Z) concatenation is stored
        self.fuse_feat, self.fuse_mask = Conv3d(c, c, 3, padding=1), Conv3d(1, c, 3, padding=1, bias=False)
        self.up = Conv3d(c * self.r**3, dim, 1)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.cross, self.self_attn, self.mlp = Attention(dim, heads), Attention(dim, heads), _mlp(dim)

    def forward(self, feats: Tensor, masks: Tensor) -> Tensor:
        """feats (B,C,x,y,z), masks (B,K,X,Y,Z) -> context tokens (B,K,m,C)."""
        (b, c), k = feats.shape[:2], masks.shape[1]
        full = self.fuse_feat(pixel_shuffle_3d(self.down(feats), self.r)).unsqueeze(1)  # (B, 1, c, X, Y, Z)
        chunk = max(1, CHUNK_ELEMENTS // (b * masks[0, 0].numel()))
        out, n = [], self.norms
        for k0 in range(0, k, chunk):
            mk = masks[:, k0:k0 + chunk]
            kc = mk.shape[1]
            # classes as groups of one depthwise conv: as a batch of 1-channel volumes, oneDNN pads each to 16
            # channels (measured 400 MB instead of 70 MB for 16 classes at 96x64x64)
            w = self.fuse_mask.weight.repeat(kc, 1, 1, 1, 1)
            x = F.conv3d(mk, w, padding=1, groups=kc).view(b, kc, *full.shape[2:]) + full
            x = self.up(pixel_unshuffle_3d(F.leaky_relu(x.flatten(0, 1), 0.01, inplace=True), self.r))
            fused = n[0]((x.view(b, kc, c, -1) + feats.view(b, 1, c, -1)).flatten(0, 1).transpose(1, 2))
            q = self.queries.expand(b * kc, -1, -1)
            q = q + self.cross(n[1](q), fused)
            x = n[2](q)
            q = q + self.self_attn(x, x)
            q = q + self.mlp(n[3](q))
            out.append(q.view(b, kc, -1, c))
        return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------------- decoder
class Decoder(nn.Module):
    """U-Net decoder (trilinear x2 up, concat skip, residual block); token interaction at the task levels."""

    def __init__(self, features: Sequence[int], levels: Sequence[int], heads: int, depth: int,
                 deep_supervision: bool):
        super().__init__()
        n = len(features) - 1
        # 1x1x1 conv before up-sampling: equal to one after it (both linear) but 8x cheaper
        self.reduce = nn.ModuleList(Conv3d(features[s + 1], features[s], 1, bias=False) for s in range(n))
        # one residual block per decoder stage; its shortcut is the up-sampled path, which saves a 1x1x1 conv
        # and a norm over the concatenation at every level (-5% query time on CPU at 64^3)
        self.stages = nn.ModuleList(ResBlock(2 * features[s], features[s], project_skip=False) for s in range(n))
        self.interact = nn.ModuleDict({str(s): nn.ModuleList(
            TwoWayLayer(features[s], attention_heads_for(features[s], heads)) for _ in range(depth)) for s in levels})
        self.carry = nn.ModuleDict({str(s): nn.Linear(features[s + 1], features[s]) for s in levels[1:]})
        self.deep_supervision = deep_supervision

    def forward(self, skips: list[Tensor], tokens: dict[int, Tensor] | None = None, stop: int = 0,
                attended_tokens: Tensor | None = None) -> tuple[list[Tensor | None], Tensor | None]:
        """Decode from the bottleneck to level `stop`; returns features per level and the final tokens.

        `attended_tokens`: the first task level's tokens after its first layer's self-attention (`attend_tokens`),
        computed beforehand."""
        x, t = skips[-1], None
        feats: list[Tensor | None] = [None] * len(skips)
        for s in range(len(skips) - 1, stop - 1, -1):
            if s < len(skips) - 1:
                up = F.interpolate(self.reduce[s](x), scale_factor=2, mode="trilinear", align_corners=False)
                x = self.stages[s](torch.cat([up, skips[s]], 1), shortcut=up)
            if tokens is not None and s in tokens:
                # tokens carried from the coarser level add query-specific context to this level's task tokens
                attended = t is None and attended_tokens is not None
                if t is None:
                    t = attended_tokens if attended else tokens[s]
                else:
                    t = tokens[s] + self.carry[str(s)](t)
                img = x.flatten(2).transpose(1, 2)
                for i, layer in enumerate(self.interact[str(s)]):
                    t, img = layer(t, img, tokens_attended=attended and i == 0)
                x = img.transpose(1, 2).reshape(x.shape)
            feats[s] = x
        return feats, t


# ---------------------------------------------------------------------------------------------- network
class IrisNetwork(nn.Module):
    """Iris: encode a task from reference image + masks once; segment any query for all K classes in one pass."""

    def __init__(self, input_channels: int,
                 features_per_stage: Sequence[int] = IrisArchitecture.features_per_stage,
                 blocks_per_stage: int | Sequence[int] = IrisArchitecture.blocks_per_stage,
                 num_query_tokens: int = IrisArchitecture.num_query_tokens,
                 task_scales: int = IrisArchitecture.task_scales,
                 attention_heads: int = IrisArchitecture.attention_heads,
                 attention_depth: int = IrisArchitecture.attention_depth,
                 position_grid: int = IrisArchitecture.position_grid,
                 num_classes: int | None = None, deep_supervision: bool = False):
        super().__init__()
        del num_classes  # nnU-Net's get_network_from_plans passes it; K comes from the task
        arch = IrisArchitecture(features_per_stage=features_per_stage, blocks_per_stage=blocks_per_stage,
                                num_query_tokens=num_query_tokens, task_scales=task_scales,
                                attention_heads=attention_heads, attention_depth=attention_depth,
                                position_grid=position_grid)
        features, n = list(arch.features_per_stage), len(arch.features_per_stage) - 1
        self.input_channels, self.features, self.num_query_tokens = input_channels, features, arch.num_query_tokens
        self.levels = arch.levels
        self.encoder = Encoder(input_channels, features, arch.blocks)
        self.decoder = Decoder(features, self.levels, arch.attention_heads, arch.attention_depth, deep_supervision)
        self.context = nn.ModuleList(ContextEncoder(features[s], s, arch.num_query_tokens,
                                                    attention_heads_for(features[s], arch.attention_heads))
                                     for s in self.levels)
        # the per-class vector reads the class's own reference foreground tokens of every task scale beside its
        # decoded token: from the decoded token alone, training found a shortcut (all classes got one vector and
        # the shared image update carried the class), which merged the classes whenever several were decoded
        # together (issue 10). The reference tokens differ per class by construction.
        c_head = features[self.levels[-1]] + sum(features[s] for s in self.levels)
        self.class_head = nn.Sequential(nn.LayerNorm(c_head),
                                        _mlp(c_head, features[0], hidden=features[self.levels[-1]]))
        # kept even while deep supervision is off so the state_dict does not depend on the flag
        self.ds_heads = nn.ModuleList(nn.Linear(features[0], features[s]) for s in range(1, n))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        # weight of log(position prior) in the logits (softplus keeps it >= 0; starts at 1), see model/position.py
        self.position_grid = arch.position_grid
        if self.position_grid:
            self.position_weight = nn.Parameter(torch.tensor(math.log(math.e - 1)))
        self._id_key: tuple | None = None
        self._id = ""
        self.apply(self.initialize)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:  # nnU-Net sets network.decoder.deep_supervision
        self.decoder.deep_supervision = bool(enabled)

    def set_deep_supervision(self, enabled: bool) -> None:
        self.deep_supervision = enabled

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init for convs, truncated normal for linears, identity norms (for `network.apply`)."""
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, a=0.01)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
        elif isinstance(module, (nn.InstanceNorm3d, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
        if isinstance(module, (nn.Conv3d, nn.Linear, nn.InstanceNorm3d, nn.LayerNorm)) \
                and getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    def model_id(self) -> str:
        """Short sha256 of the weights; cached on (data_ptr, _version) of every tensor, so cheap when unchanged.

        Writes through `.data`, and to weights created in inference mode (no version counter), are not seen;
        after such writes set `self._id_key = None`."""
        state = self.state_dict(keep_vars=True)
        key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in state.values())
        if key != self._id_key:
            h = hashlib.sha256()
            for name, t in state.items():
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
            self._id_key, self._id = key, h.hexdigest()[:16]
        return self._id

    def _check_image(self, x: Tensor, name: str) -> None:
        div = 2 ** (len(self.features) - 1)
        if x.dim() != 5 or x.shape[1] != self.input_channels:
            raise ValueError(f"{name} must be (B, {self.input_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(s % div for s in x.shape[2:]):
            raise ValueError(f"{name} spatial size {tuple(x.shape[2:])} must be divisible by {div} "
                             f"(2**{len(self.features) - 1} for {len(self.features)} stages)")

    def encode_task(self, reference_image: Tensor, reference_masks: Tensor,
                    classes: Sequence[int] | None = None, positions: Tensor | None = None) -> TaskEmbedding:
        """Reference image (B,C,X,Y,Z) and K binary masks (B,K,X,Y,Z) -> TaskEmbedding (classes default 1..K).

        `positions` (B,K,G,G,G): where each class lies in its whole reference scan (`position_prior` of the scan's
        masks); by default the masks given are taken to cover the whole scan. Ignored by models without a
        position grid."""
        self._check_image(reference_image, "reference_image")
        b, k = reference_masks.shape[:2]
        if reference_masks.dim() != 5 or b != reference_image.shape[0] \
                or reference_masks.shape[2:] != reference_image.shape[2:]:
            raise ValueError(f"reference_masks must be (B, K, X, Y, Z) matching the image "
                             f"{tuple(reference_image.shape)}, got {tuple(reference_masks.shape)}")
        masks = reference_masks.to(reference_image.dtype)
        feats, _ = self.decoder(self.encoder(reference_image), None, stop=self.levels[-1])
        tokens = [torch.cat([full_res_masked_average(feats[s], masks).unsqueeze(2), ctx(feats[s], masks)], 2)
                  for s, ctx in zip(self.levels, self.context)]
        classes = list(range(1, k + 1)) if classes is None else list(classes)
        if not self.position_grid:
            positions = None
        elif positions is None:
            positions = position_prior(masks, self.position_grid)
        elif tuple(positions.shape) != (b, k, *(self.position_grid,) * 3):
            raise ValueError(f"positions must be (B, K, G, G, G) = {(b, k, *(self.position_grid,) * 3)}, "
                             f"got {tuple(positions.shape)}")
        return TaskEmbedding(tokens, classes, (masks > 0).flatten(2).any(-1),
                             TRAINING_MODEL_ID if self.training else self.model_id(),
                             None if positions is None else positions.to(reference_image.device, torch.float32))

    def check_task(self, task: TaskEmbedding) -> None:
        """Raise TaskMismatchError unless `task` was encoded by these weights (in eval mode)."""
        if task.model_id != self.model_id():
            hint = " (in training mode: re-encode in eval mode)" if task.model_id == TRAINING_MODEL_ID else ""
            raise TaskMismatchError(f"task was encoded by model {task.model_id}{hint}, not by this model "
                                    f"{self.model_id()}")

    def forward(self, query: Tensor, task: TaskEmbedding, coordinates: Tensor | None = None, *,
                check_model: bool = True, attended_tokens: Tensor | None = None) -> Tensor | list[Tensor]:
        """Query (B,C,X,Y,Z) -> logits (B,K,X,Y,Z) for all K task classes (a list, full res first, with DS).

        `coordinates` (B,3,X,Y,Z): each query voxel's position in its whole scan (`scan_coordinates`,
        `window_coordinates`); by default the query is taken to be the whole scan. `check_model=False` skips
        `check_task` (a sliding window checks once per query, not per window). `attended_tokens`: this task's
        `attended_task_tokens`, which a sliding window computes once instead of once per window."""
        self._check_image(query, "query")
        # in training the weights change every step and tasks are re-encoded every step: hashing is skipped
        if check_model and not self.training:
            self.check_task(task)
        b, k, m1 = query.shape[0], task.num_classes, self.num_query_tokens + 1
        expected = [(m1, self.features[s]) for s in self.levels]
        if [tuple(t.shape[2:]) for t in task.tokens] != expected or task.batch_size not in (1, b):
            raise TaskMismatchError(f"task tokens {[tuple(t.shape) for t in task.tokens]} do not fit this model "
                                    f"(per scale (B in {{1, {b}}}, K, m+1, C) = {expected})")
        tokens = {s: t.to(query.device, query.dtype).expand(b, -1, -1, -1).reshape(b, k * m1, -1)
                  for s, t in zip(self.levels, task.tokens)}
        if attended_tokens is not None:
            if attended_tokens.shape[0] not in (1, b) or attended_tokens.shape[1:] != tokens[self.levels[0]].shape[1:]:
                raise TaskMismatchError(f"attended tokens {tuple(attended_tokens.shape)} do not fit the task's "
                                        f"{tuple(tokens[self.levels[0]].shape)}")
            attended_tokens = attended_tokens.to(query.device, query.dtype).expand(b, -1, -1)
        feats, t = self.decoder(self.encoder(query), tokens, attended_tokens=attended_tokens)
        own = [tokens[s].view(b, k, m1, -1)[:, :, 0] for s in self.levels]  # each class's reference fg tokens
        vec = self.class_head(torch.cat([t.view(b, k, m1, -1)[:, :, 0], *own], -1))
        logits = [self._dot(vec, feats[0])]
        if self.deep_supervision:
            logits += [self._dot(head(vec), feats[s]) for s, head in enumerate(self.ds_heads, start=1)]
        if self.position_grid and task.positions is not None:
            logits = self._add_position(logits, task, query, coordinates)
        return logits if self.deep_supervision else logits[0]

    def attended_task_tokens(self, task: TaskEmbedding) -> Tensor:
        """(B, K(m+1), C) the task's tokens after the first token self-attention of the decoder, the one step of a
        query's decoding that depends on the task alone (at 85 classes a tenth of a 32^3 window's time on CPU)."""
        t = task.tokens[0]  # the first task level's: levels run from the bottleneck, as the tokens do
        return self.decoder.interact[str(self.levels[0])][0].attend_tokens(t.reshape(t.shape[0], -1, t.shape[-1]))

    def _add_position(self, logits: list[Tensor], task: TaskEmbedding, query: Tensor,
                      coordinates: Tensor | None) -> list[Tensor]:
        """logits + weight * log(prior + floor), the prior sampled at every voxel's scan coordinates."""
        if tuple(task.positions.shape[2:]) != (self.position_grid,) * 3:
            raise TaskMismatchError(f"task positions {tuple(task.positions.shape)} do not fit this model's "
                                    f"{self.position_grid}^3 position grid")
        if coordinates is None:
            coordinates = scan_coordinates(query.shape[2:], query.device).expand(query.shape[0], -1, -1, -1, -1)
        elif coordinates.shape[0] != query.shape[0] or coordinates.shape[1] != 3 \
                or coordinates.shape[2:] != query.shape[2:]:
            raise ValueError(f"coordinates must be (B, 3, X, Y, Z) = {(query.shape[0], 3, *query.shape[2:])}, "
                             f"got {tuple(coordinates.shape)}")
        out = []
        for i, x in enumerate(logits):
            c = coordinates.float() if i == 0 else F.avg_pool3d(coordinates.float(), 2**i)  # centres of pooled voxels
            out.append(x + self.position_logits(task.positions, c).to(x.dtype))
        return out

    def position_logits(self, positions: Tensor, coordinates: Tensor) -> Tensor:
        """The position prior's term of the logits, weight * log(prior + floor): priors (B or 1, K, G, G, G) sampled
        at grid coordinates (B, 3, X, Y, Z) -> (B, K, X, Y, Z). It depends on a voxel's scan position alone, so a
        sliding window may add it once per voxel after averaging the windows."""
        prior = positions.to(coordinates.device, torch.float32)
        return F.softplus(self.position_weight) * torch.log(sample_prior(prior, coordinates.float()) + POSITION_FLOOR)

    def _dot(self, vec: Tensor, feats: Tensor) -> Tensor:
        out = torch.bmm(vec, feats.flatten(2)) + self.logit_bias
        return out.view(*vec.shape[:2], *feats.shape[2:])


def build_network(architecture: dict, input_channels: int, deep_supervision: bool = False) -> nn.Module:
    """Build from an nnU-Net plans `architecture` entry (dotted class path + arch_kwargs) without nnunetv2."""
    def locate(dotted: str):
        module, _, name = dotted.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ImportError(f"cannot import {dotted!r} from the architecture entry") from e

    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = locate(kwargs[key])
    network_class = locate(architecture["network_class_name"])
    if isinstance(network_class, type) and issubclass(network_class, IrisNetwork):
        kwargs["position_grid"] = IrisArchitecture.from_kwargs(kwargs).position_grid  # older plans: none
    return network_class(input_channels=input_channels, deep_supervision=deep_supervision, **kwargs)
