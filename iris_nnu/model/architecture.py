"""The one description of IrisNetwork's shape, shared by the network, its memory model and the planner.

Plain arithmetic: this module uses no torch (importing it through `iris_nnu.model` still loads the network, and torch).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

FUSE_CHANNELS = 1  # channels of the full-resolution mask fusion: the method's "1x1x1 conv C -> r^3 channels"
CHUNK_ELEMENTS = 2**25  # encode classes in chunks so one full-resolution fusion tensor stays under ~128 MB (fp32)
MLP_RATIO = 4
# IrisNetwork keywords that are no part of the architecture; accepted (and ignored) in arch_kwargs because nnU-Net
# passes num_classes and a plans entry may carry it
_CONSTRUCTION_KEYS = frozenset({"num_classes", "deep_supervision"})


@dataclass(frozen=True)
class IrisArchitecture:
    """Widths, depth and token layout of an IrisNetwork; plans store it as `arch_kwargs` (see to_kwargs).

    Sequences are stored as tuples of int."""

    features_per_stage: Sequence[int] = (32, 64, 128, 256, 512)
    blocks_per_stage: int | Sequence[int] = 2
    num_query_tokens: int = 10
    task_scales: int = 3  # clamped to the number of stages (see levels)
    attention_heads: int = 8  # per scale, the largest count <= this that divides the width
    attention_depth: int = 1
    position_grid: int = 32  # cells per axis of the position prior a task carries (model/position.py); 0: none

    def __post_init__(self) -> None:
        b = self.blocks_per_stage
        normalised = dict(features_per_stage=tuple(int(f) for f in self.features_per_stage),
                          blocks_per_stage=b if isinstance(b, int) else tuple(int(v) for v in b),
                          **{name: int(getattr(self, name))
                             for name in ("num_query_tokens", "task_scales", "attention_heads", "attention_depth",
                                       "position_grid")})
        for name, value in normalised.items():  # JSON lists become tuples (frozen, hashable)
            object.__setattr__(self, name, value)
        if len(self.features_per_stage) < 2 or len(self.blocks) != len(self.features_per_stage) \
                or min(self.blocks) < 1:
            raise ValueError(f"need >= 2 stages and >= 1 block per stage, got {list(self.features_per_stage)}, "
                             f"{self.blocks_per_stage}")
        if self.task_scales < 1 or self.num_query_tokens < 1 or self.attention_depth < 1:
            raise ValueError("task_scales, num_query_tokens and attention_depth must be >= 1")
        if self.position_grid < 0:
            raise ValueError(f"position_grid must be >= 0, got {self.position_grid}")

    @classmethod
    def from_kwargs(cls, arch_kwargs: Mapping[str, Any]) -> IrisArchitecture:
        """From a plans' `arch_kwargs`; missing keys take the defaults, unknown keys raise ValueError.

        Except `position_grid`: plans without it were written before position priors, and their models have none."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(arch_kwargs) - names - _CONSTRUCTION_KEYS)
        if unknown:
            raise ValueError(f"unknown IrisNetwork arch_kwargs {unknown}; known: {sorted(names)}")
        return cls(**{"position_grid": 0, **{k: v for k, v in arch_kwargs.items() if k in names}})

    def to_kwargs(self) -> dict[str, Any]:
        """The plans' `arch_kwargs` (JSON types: lists, not tuples)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}

    @property
    def blocks(self) -> list[int]:
        """Residual blocks of each encoder stage."""
        b = self.blocks_per_stage
        return [b] * len(self.features_per_stage) if isinstance(b, int) else list(b)

    @property
    def levels(self) -> list[int]:
        """Task levels, bottleneck first (level s is at 1/2^s resolution)."""
        n = len(self.features_per_stage) - 1
        # clamped like attention_heads, so shallow planned nets just work
        return list(range(n, n - min(self.task_scales, n + 1), -1))
