"""Segmenter: a preprocessed query, its task(s) and its scan frame -> per-class logits.

Everything a window's forward needs is an argument: the fold networks, the task (one per fold), the frame (where
the query's body lies, for the position prior). Classes go in passes, folds are averaged and mirrored TTA flips are
plain loops around `sliding_window_logits`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.sliding_window import sliding_window_logits
from iris_nnu.model import IrisNetwork, TaskEmbedding
from iris_nnu.model.position import ScanFrame

# nnU-Net accumulates Gaussian-weighted logits in fp16; clamping keeps the sums finite (sigmoid(16) = 1 - 1e-7,
# beyond fp16's resolution of probabilities anyway) for every step size >= MIN_STEP_SIZE (<= 125 windows a voxel).
LOGIT_LIMIT = 16.0
MIN_STEP_SIZE = 0.2

# how the windows' networks compute: "auto" is bfloat16 on a CPU with AMX tiles (oneDNN's bf16 convolutions and
# matmuls run natively there: -13 to -18% per window of the bundled model at 5 to 85 classes,
# benchmarks/model_speed.py), float32 on other CPUs (emulated bf16 is slower); CUDA always uses float16 autocast, as
# nnU-Net does
PRECISIONS = ("auto", "float32", "bfloat16")
DEFAULT_PRECISION = "auto"


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles), where bf16 windows are faster than float32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def window_precision(precision: str, device: torch.device | str) -> str:
    """The precision `precision` ("auto", "float32" or "bfloat16") means on `device`: on a CPU as asked ("auto"
    resolved), "float16" on CUDA, "float32" on other devices (MPS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = torch.device(device).type
    if kind != "cpu":
        return "float16" if kind == "cuda" else "float32"
    if precision == "auto":
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    return precision


def window_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context the windows run under (`precision` as window_precision resolves it)."""
    device = torch.device(device)
    resolved = window_precision(precision, device)
    if resolved == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if resolved == "float16" else torch.bfloat16)


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of the mirroring axes: the flips of mirrored TTA."""
    axes = tuple(axes)
    return [combo for n in range(1, len(axes) + 1) for combo in itertools.combinations(axes, n)]


@dataclass
class Segmenter:
    """Sliding-window segmentation with Iris networks (one per fold of an ensemble).

    Args:
        networks: the fold networks, in eval mode on `device`.
        patch_size: the window (voxels).
        step_size: window step as a fraction of the patch (nnU-Net's tile_step_size).
        mirror_axes: mirrored TTA on every combination of these axes (empty: no TTA); a task must then hold the
            tokens of its references flipped the same way (TaskEmbedding.mirrored).
        position_prior: False segments from the image alone, ignoring where the references hold each class.
        device: where the networks run; on CUDA the sums stay there too (CPU if they do not fit).
        precision: how the windows compute on a CPU: "auto", "float32" or "bfloat16" (PRECISIONS); CUDA uses
            float16 autocast whatever it says.
        progress: a progress bar over the windows.
    """

    networks: Sequence[IrisNetwork]
    patch_size: tuple[int, ...]
    step_size: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    position_prior: bool = True
    device: torch.device = torch.device("cpu")
    precision: str = DEFAULT_PRECISION
    progress: bool = False

    def __post_init__(self) -> None:
        if not MIN_STEP_SIZE <= self.step_size <= 1:
            raise ValueError(f"step size must be in [{MIN_STEP_SIZE}, 1], got {self.step_size}")
        self.device = torch.device(self.device)
        window_precision(self.precision, self.device)  # refuses an unknown one here, not at the first window

    @property
    def flips(self) -> list[tuple[int, ...]]:
        return mirror_flips(self.mirror_axes)

    def logits(self, image: torch.Tensor, tasks: Sequence[TaskEmbedding], frame: ScanFrame | None,
               classes: Sequence[int] | None = None, box: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """(K, X, Y, Z) logits on CPU of `classes` (default: the tasks') in the preprocessed image (C, X, Y, Z).

        `tasks`: one per network; `frame`: the query's scan frame (None only where no position prior is used: a
        model without one, or `position_prior=False`); `box`: [lo, hi) per axis where the windows run (a CT's body,
        plans.BODY_BOX_KEY), widened to the patch where the image allows; outside it every class gets -LOGIT_LIMIT.
        A fold ensemble gives the logit of the mean of the folds' sigmoid maps."""
        if len(tasks) != len(self.networks):
            raise ValueError(f"{len(tasks)} task(s) for {len(self.networks)} fold network(s): give one per fold")
        total = logits = None
        for network, task in zip(self.networks, tasks):
            task = task if classes is None else task.select(list(classes))
            logits = self._network_logits(image, network, task, frame, box).cpu()
            if len(tasks) == 1:
                return logits
            probability = torch.sigmoid(logits.float())
            total = probability if total is None else total.add_(probability)
        return torch.logit(total.div_(len(tasks))).clamp_(-LOGIT_LIMIT, LOGIT_LIMIT).to(logits.dtype)

    def uses_position(self, network: IrisNetwork, task: TaskEmbedding) -> bool:
        return bool(self.position_prior and network.position_grid and task.positions is not None)

    def window_region(self, shape: Sequence[int], box: Sequence[Sequence[int]] | None) -> tuple[slice, ...]:
        """`box` widened about its centre to the patch size along each axis where `shape` allows, so that its windows
        see the image rather than padding (the whole image without a box)."""
        if box is None:
            return tuple(slice(0, n) for n in shape)
        region = []
        for (lo, hi), p, n in zip(box, self.patch_size, shape):
            lo, hi = max(0, int(lo)), min(n, int(hi))
            missing = max(0, min(p, n) - (hi - lo))
            lo = max(0, min(lo - missing // 2, n - max(p, hi - lo)))
            region.append(slice(lo, min(n, max(hi, lo + p))))
        return tuple(region)

    def _network_logits(self, image: torch.Tensor, network: IrisNetwork, task: TaskEmbedding,
                        frame: ScanFrame | None, box: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        task = (task if self.position_prior else dataclasses.replace(task, positions=None)).to(self.device)
        network.check_task(task)  # once per query, not per window
        missing = [axes for axes in self.flips if axes not in (task.mirrored or {})]
        if missing:
            raise IrisInputError(f"mirrored TTA on axes {self.mirror_axes}: the task holds no tokens of its references "
                                 f"flipped on {missing} (encode the references with mirroring on; a tuned task has "
                                 f"none)")
        use_position = self.uses_position(network, task)
        if use_position and frame is None:
            raise ValueError("the position prior needs the query's scan frame")
        # the windows see the image alone; the prior's term depends on a voxel's scan position only (the same in
        # every window and flip that holds it), so it is added once per voxel afterwards, not once per window
        image_task = dataclasses.replace(task, positions=None)
        flipped_tasks = {axes: image_task.flipped(axes) for axes in self.flips}
        attended: dict[tuple[int, ...], torch.Tensor] = {}  # per flip (() none): computed once, not per window

        def forward(window: torch.Tensor, where: tuple[slice, ...]) -> torch.Tensor:
            prediction = network(window, image_task, check_model=False,
                                 attended_tokens=attended[()]).float()  # sums of flips in float32
            for axes, flipped_task in flipped_tasks.items():
                dims = [a + 2 for a in axes]
                prediction += torch.flip(network(torch.flip(window, dims), flipped_task, check_model=False,
                                                 attended_tokens=attended[axes]), dims)
            if flipped_tasks:
                prediction /= len(flipped_tasks) + 1
            return prediction.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)

        on_gpu = self.device.type == "cuda"
        region = self.window_region(image.shape[1:], box)
        whole = image
        image = image[(slice(None), *region)]
        with window_autocast(self.precision, self.device):
            with torch.no_grad():  # in the windows' precision, so that the windows' logits do not change
                attended.update({axes: network.attended_task_tokens(t)
                                 for axes, t in {(): image_task, **flipped_tasks}.items()})
            try:
                logits = sliding_window_logits(image, task.num_classes, self.patch_size, self.step_size, forward,
                                               self.device, self.device if on_gpu else "cpu", self.progress)
            except torch.OutOfMemoryError:
                if not on_gpu:
                    raise
                torch.cuda.empty_cache()  # the sums do not fit beside the network: keep them on the CPU
                logits = sliding_window_logits(image, task.num_classes, self.patch_size, self.step_size, forward,
                                               self.device, "cpu", self.progress)
        if use_position:
            add_position_logits(logits, network, task.positions, frame, origin=[r.start for r in region])
        if image.shape == whole.shape:
            return logits
        full = torch.full((task.num_classes, *whole.shape[1:]), -LOGIT_LIMIT, dtype=logits.dtype, device=logits.device)
        full[(slice(None), *region)] = logits
        return full


# the prior's term is computed in slabs of at most this many float32 values (K x slab voxels): small slabs keep the
# temporaries in cache (85 brain classes over 1.5M voxels on one thread: 2.1 s at 2**21 values, 3.4 s at 2**25)
POSITION_CHUNK_VALUES = 2**21


@torch.inference_mode()
def add_position_logits(logits: torch.Tensor, network: IrisNetwork, positions: torch.Tensor, frame: ScanFrame,
                        origin: Sequence[int] = (0, 0, 0)) -> None:
    """logits (K, X, Y, Z) += the position prior's term at each voxel's scan coordinates (clamped as the windows' are),
    in slabs along the first axis; `origin`: the scan voxel of the logits' first one (a region of the scan)."""
    k, x, *rest = logits.shape
    step = max(1, POSITION_CHUNK_VALUES // (k * rest[0] * rest[1]))
    for lo in range(0, x, step):
        n = min(step, x - lo)
        coordinates = frame.coordinates((origin[0] + lo, origin[1], origin[2]), (n, *rest), logits.device)[None]
        term = network.position_logits(positions, coordinates)[0]
        logits[:, lo:lo + n] = (logits[:, lo:lo + n].float() + term).clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)
