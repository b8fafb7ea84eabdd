"""TaskEmbedding: the encoded task (per-class tokens at each task scale) that conditions the query pass."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from iris_nnu.files import write_atomic

if TYPE_CHECKING:
    from .network import IrisNetwork

FORMAT_VERSION = "iris_nnu.task_embedding/1"
# model_id of tasks encoded in training mode: hashing the weights every step would be wasteful because they
# change every step; such a task is refused by a model in eval mode until a caller vouches for it
# (dataclasses.replace(task, model_id=model.model_id())).
TRAINING_MODEL_ID = "training"


def checked_threshold(threshold: float | Mapping[int, float]) -> float | dict[int, float]:
    """A decision threshold (one probability, or one per class value) as float or {int: float}; ValueError unless
    every probability is in (0, 1)."""
    checked = {int(c): float(t) for c, t in threshold.items()} if isinstance(threshold, Mapping) else float(threshold)
    if not all(0 < t < 1 for t in (checked.values() if isinstance(checked, dict) else [checked])):
        raise ValueError(f"decision_threshold must be in (0, 1), got {threshold}")
    return checked


class TaskMismatchError(ValueError):
    """A task embedding does not belong to this model (other weights) or to the other tasks (other shapes)."""


@dataclass(eq=False)
class TaskEmbedding:
    tokens: list[Tensor]  # per task scale (B, K, m+1, C_scale); index 0 = foreground token, 1..m = context tokens
    classes: list[int]  # label values of the K classes
    present: Tensor  # (B, K) bool: class k had a non-empty mask in reference b
    model_id: str  # IrisNetwork.model_id() of the network that made it
    positions: Tensor | None = None  # (B, K, G, G, G) where each class lies in its reference scan (model/position.py)
    # mirrored test-time augmentation: tokens (as `tokens`) encoded from the reference crops flipped on these spatial
    # axes (0, 1, 2 = X, Y, Z of the network's input); a query flipped the same way is segmented with them
    mirrored: dict[tuple[int, ...], list[Tensor]] | None = None
    # isotropic spacing (mm) the references were encoded at; queries are segmented at the same (None: the plan's)
    spacing: float | None = None
    # structure names by label value (a reference folder's dataset.json, or --label_names); None: unnamed
    names: dict[int, str] | None = None
    # voxel order (orientation code, e.g. 'RAS') the references were read in; queries are read the same way
    orientation: str | None = None
    # the references' bodies: their frames' spreads (voxels at `spacing`, sorted), for the field-of-view check
    extent: tuple[float, float, float] | None = None
    # the decision threshold the task segments at (calibrated on its references: iris_predict --threshold auto),
    # one probability or one per class value; None: not recorded (0.5)
    decision_threshold: float | dict[int, float] | None = None
    # the sliding window's step the task segments at (chosen on its references: iris_predict -step_size auto);
    # None: not recorded (0.5)
    window_step: float | None = None
    # the class values whose largest connected component alone it keeps (chosen on its references: iris_predict
    # --postprocess auto); None: not recorded (none)
    largest_component: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.tokens)
        if self.mirrored is not None:
            self.mirrored = {tuple(sorted(int(a) for a in axes)): list(t) for axes, t in self.mirrored.items()}
            if any([u.shape for u in t] != [u.shape for u in self.tokens] for t in self.mirrored.values()):
                raise ValueError("mirrored tokens must have the shapes of the tokens")
        self.classes = [int(c) for c in self.classes]
        self.spacing = None if self.spacing is None else float(self.spacing)
        self.extent = None if self.extent is None else tuple(float(e) for e in self.extent)
        if self.decision_threshold is not None:
            self.decision_threshold = checked_threshold(self.decision_threshold)
        if self.window_step is not None:
            self.window_step = float(self.window_step)
            if not 0 < self.window_step <= 1:
                raise ValueError(f"window_step must be in (0, 1], got {self.window_step}")
        self.names = None if self.names is None else {int(v): str(n) for v, n in self.names.items()}
        if self.largest_component is not None:
            self.largest_component = tuple(sorted(int(v) for v in self.largest_component))
        if not self.tokens or any(t.dim() != 4 for t in self.tokens):
            raise ValueError("tokens must be a non-empty list of (B, K, m+1, C) tensors")
        b, k = self.tokens[0].shape[:2]
        if any(t.shape[:3] != self.tokens[0].shape[:3] for t in self.tokens):
            raise ValueError(f"token scales disagree on (B, K, m+1): {[tuple(t.shape) for t in self.tokens]}")
        if len(self.classes) != k or len(set(self.classes)) != k:
            raise ValueError(f"need {k} distinct class values, got {self.classes}")
        self.present = torch.as_tensor(self.present, dtype=torch.bool, device=self.tokens[0].device)
        if tuple(self.present.shape) != (b, k):
            raise ValueError(f"present must have shape {(b, k)}, got {tuple(self.present.shape)}")
        if self.positions is not None and (self.positions.dim() != 5 or tuple(self.positions.shape[:2]) != (b, k)):
            raise ValueError(f"positions must be (B, K, G, G, G) with (B, K) = {(b, k)}, "
                             f"got {tuple(self.positions.shape)}")

    def _map_tokens(self, fn) -> tuple[list[Tensor], dict[tuple[int, ...], list[Tensor]] | None]:
        """`fn(token list)` applied to the tokens and to each mirrored token list."""
        mirrored = None if self.mirrored is None else {axes: fn(t) for axes, t in self.mirrored.items()}
        return fn(self.tokens), mirrored

    def flipped(self, axes: tuple[int, ...]) -> TaskEmbedding:
        """The task encoded from the references flipped on `axes` (a key of `mirrored`)."""
        if not self.mirrored or tuple(axes) not in self.mirrored:
            raise KeyError(f"no tokens for the references flipped on axes {tuple(axes)} "
                           f"(this task has {sorted(self.mirrored or {})})")
        return dataclasses.replace(self, tokens=self.mirrored[tuple(axes)], mirrored=None)

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]

    @property
    def num_classes(self) -> int:
        return self.tokens[0].shape[1]

    def mean(self) -> TaskEmbedding:
        """Context ensemble: per class, average over the references where the class is present (B becomes 1)."""
        w = self.present.to(self.tokens[0].dtype)  # (B, K)
        count = w.sum(0)
        missing = [c for c, n in zip(self.classes, count.tolist()) if n == 0]
        if missing:
            raise ValueError(f"class(es) {missing} are present in none of the {self.batch_size} references")
        tokens, mirrored = self._map_tokens(
            lambda ts: [(t * w[:, :, None, None]).sum(0, keepdim=True) / count[None, :, None, None] for t in ts])
        positions = None if self.positions is None else \
            (self.positions * w[:, :, None, None, None].to(self.positions)).sum(0, keepdim=True) \
            / count[None, :, None, None, None].to(self.positions)  # several references: a multi-atlas prior
        return dataclasses.replace(self, tokens=tokens, present=torch.ones_like(self.present[:1]), positions=positions,
                                   mirrored=mirrored)

    def select(self, classes: Sequence[int]) -> TaskEmbedding:
        """Reorder / subset the classes by label value."""
        unknown = [int(c) for c in classes if int(c) not in self.classes]
        if unknown:
            raise KeyError(f"class(es) {unknown} not in this task (it has {self.classes})")
        idx = torch.tensor([self.classes.index(int(c)) for c in classes], device=self.present.device)
        tokens, mirrored = self._map_tokens(lambda ts: [t.index_select(1, idx) for t in ts])
        return dataclasses.replace(
            self, tokens=tokens, classes=[int(c) for c in classes], present=self.present.index_select(1, idx),
            positions=None if self.positions is None else self.positions.index_select(1, idx.to(self.positions.device)),
            mirrored=mirrored,
            names=None if self.names is None else {int(c): self.names[int(c)] for c in classes if int(c) in self.names})

    @staticmethod
    def concatenate(tasks: Sequence[TaskEmbedding]) -> TaskEmbedding:
        """Stack along B over the sorted union of classes; a class missing from a task is zero and not present."""
        if not tasks:
            raise ValueError("nothing to concatenate")
        first = tasks[0]
        shapes = [t.shape[2:] for t in first.tokens]
        for task in tasks[1:]:
            if task.model_id != first.model_id:
                raise TaskMismatchError(f"tasks from different models: {first.model_id} vs {task.model_id}")
            if [t.shape[2:] for t in task.tokens] != shapes:
                raise TaskMismatchError(f"token shapes differ: {shapes} vs {[t.shape[2:] for t in task.tokens]}")
            if (task.positions is None) != (first.positions is None) or (
                    task.positions is not None and task.positions.shape[2:] != first.positions.shape[2:]):
                raise TaskMismatchError("tasks disagree on position priors")
            if task.spacing != first.spacing:
                raise TaskMismatchError(f"tasks encoded at different spacings: {first.spacing} vs {task.spacing} mm")
            if task.orientation != first.orientation:
                raise TaskMismatchError(f"tasks read in different voxel orders: {first.orientation} vs "
                                        f"{task.orientation}")
            if sorted(task.mirrored or {}) != sorted(first.mirrored or {}):
                raise TaskMismatchError(f"tasks disagree on mirrored tokens: {sorted(first.mirrored or {})} vs "
                                        f"{sorted(task.mirrored or {})}")
        classes = sorted(set().union(*(t.classes for t in tasks)))
        where = [torch.tensor([classes.index(c) for c in t.classes], device=first.present.device) for t in tasks]

        def stacked(token_lists: list[list[Tensor]]) -> list[Tensor]:
            """Per scale, each task's tokens placed at its classes' columns, concatenated along B."""
            return [torch.cat([first.tokens[i].new_zeros(task.batch_size, len(classes), *shapes[i]).index_copy(
                1, pos, ts[i].to(first.tokens[i])) for task, pos, ts in zip(tasks, where, token_lists)])
                for i in range(len(shapes))]

        present, positions = [], []
        for task, pos in zip(tasks, where):
            p = torch.zeros(task.batch_size, len(classes), dtype=torch.bool, device=first.present.device)
            present.append(p.index_copy(1, pos, task.present.to(p.device)))
            if task.positions is not None:
                z = first.positions.new_zeros(task.batch_size, len(classes), *first.positions.shape[2:])
                positions.append(z.index_copy(1, pos.to(z.device), task.positions.to(z)))
        mirrored = None if first.mirrored is None else \
            {axes: stacked([t.mirrored[axes] for t in tasks]) for axes in first.mirrored}
        names = {v: n for t in reversed(tasks) for v, n in (t.names or {}).items()}  # the first task's name wins
        extents = [t.extent for t in tasks if t.extent is not None]
        return dataclasses.replace(
            first, tokens=stacked([t.tokens for t in tasks]), classes=classes, present=torch.cat(present),
            positions=torch.cat(positions) if positions else None, mirrored=mirrored,
            names=names if any(t.names is not None for t in tasks) else None,
            extent=tuple(np.mean(extents, axis=0)) if extents else None,
            # a threshold calibrated on some of the tasks' references holds for the union only where they agree
            decision_threshold=first.decision_threshold
            if all(t.decision_threshold == first.decision_threshold for t in tasks[1:]) else None,
            window_step=first.window_step if all(t.window_step == first.window_step for t in tasks[1:]) else None,
            largest_component=first.largest_component
            if all(t.largest_component == first.largest_component for t in tasks[1:]) else None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskEmbedding:
        tokens, mirrored = self._map_tokens(lambda ts: [t.to(device=device, dtype=dtype) for t in ts])
        return dataclasses.replace(self, tokens=tokens, present=self.present.to(device=device), mirrored=mirrored,
                                   positions=None if self.positions is None else self.positions.to(device=device))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same folder, then os.replace)."""
        state = {"format": FORMAT_VERSION, "tokens": [t.detach().cpu() for t in self.tokens],
                 "classes": list(self.classes), "present": self.present.cpu(), "model_id": self.model_id,
                 "positions": None if self.positions is None else self.positions.detach().cpu(),
                 "mirrored": None if self.mirrored is None else
                 [[list(axes), [t.detach().cpu() for t in ts]] for axes, ts in self.mirrored.items()],
                 "spacing": self.spacing, "names": self.names, "orientation": self.orientation,
                 "extent": None if self.extent is None else list(self.extent),
                 "decision_threshold": self.decision_threshold, "window_step": self.window_step,
                 "largest_component": None if self.largest_component is None else list(self.largest_component)}
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, model: IrisNetwork | None = None) -> TaskEmbedding:
        """Load on CPU; with `model` given, refuse a task encoded by other weights."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a task embedding file of format {FORMAT_VERSION}")
        tensors = [*state.get("tokens", []), state.get("positions"),
                   *(t for _, ts in state.get("mirrored") or [] for t in ts)]
        if any(isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(f"{path} holds NaN or infinite values in its embedding (a damaged task file: encode it "
                             f"again)")
        mirrored = state.get("mirrored")  # absent from files written before mirrored TTA
        task = cls(state["tokens"], state["classes"], state["present"], state["model_id"], state.get("positions"),
                   None if mirrored is None else {tuple(axes): ts for axes, ts in mirrored},
                   state.get("spacing"),  # absent from files written before the spacing rule
                   names=state.get("names"),  # absent from files written before structure names
                   orientation=state.get("orientation"),  # ... and before one voxel order per run
                   extent=state.get("extent"),
                   decision_threshold=state.get("decision_threshold"),  # absent before calibrated thresholds
                   window_step=state.get("window_step"),  # ... and before the step chosen on the references
                   largest_component=state.get("largest_component"))  # ... and before components chosen on them
        if model is not None and model.model_id() != task.model_id:
            raise TaskMismatchError(
                f"task file {path} was encoded by model {task.model_id}, not by this model {model.model_id()}")
        return task
