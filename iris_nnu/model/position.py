"""Where a class lies in its scan: the position prior that a task carries beside its tokens.

A query window of 32^3 voxels at 1.5 mm shows 48 mm of a 140 mm brain: many structures look alike there (cortical
parcels are the same grey matter, told apart only by where they are), and a network that sees one window cannot
know where in the scan it is. Position enters Iris here as data, not as a learned embedding:

- each scan gets a frame from its body (the voxels nnU-Net keeps inside the non-zero mask): centre, principal axes
  and spread, so that coordinates mean the same place in every scan whatever its field of view or head tilt;
- each reference class becomes its occupancy on a G^3 grid in those coordinates (blurred, peak 1);
- the network adds `weight * log(prior + floor)` at each query voxel's coordinates to the class's logit.

Measured on OASIS as label propagation through the frames alone (references oasis_002 / oasis_007, queries
oasis_001 / 008 / 012; mean Dice over 85 structures, subcortical in brackets): scans' boxes mapped onto each other
0.224 (0.375), centre and spread per axis 0.240 (0.439), principal axes 0.338 (0.562); the position-blind network
reached 0.02.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Blur of the occupancy grid, in grid cells: brains aligned by their frames still disagree by several mm, ~1 cell
# of a 32^3 grid over a brain (propagation through a box-aligned grid: sigma 0 / 0.5 / 1 / 2 cells gave mean Dice
# 0.311 / 0.316 / 0.309 / 0.267 on OASIS; a blurred prior leaves the boundary to the image evidence).
POSITION_SIGMA_CELLS = 1.0
# The prior can make a voxel at most this much less likely than the peak (log(floor) is the largest penalty per unit
# of weight): a reference is one example, and structures do move between scans.
POSITION_FLOOR = 0.01
# The grid spans +-EXTENT standard deviations of the body along each frame axis (a uniform box spans +-1.73).
POSITION_EXTENT = 2.5
# Principal axes are used only where they are defined (spreads apart by this ratio) and turn the frame by at most this
# angle from the scan's axes; otherwise the frame keeps the scan's axes (a near-spherical body, a crop). The limits
# are loose on purpose: two scans framed by different rules do not match. Measured on the 15 OASIS brains: spreads
# 1.09-1.18 apart (the two shorter axes), principal axes turned 2-27 degrees; with 1.1 and 30 degrees oasis_008 fell
# back and oasis_007 did not, and one-shot Dice between them dropped to 0.10.
DISTINCT_SPREAD_RATIO = 1.02
MAX_ROTATION_DEGREES = 45.0
MAX_FRAME_VOXELS = 2_000_000  # bodies larger than this are subsampled for the frame's moments


@dataclass(frozen=True)
class ScanFrame:
    """Where a scan's body lies, in voxels of the (preprocessed) scan: `axes @ (x - centre)` is a voxel's position
    in units of the body's spread along each frame axis."""

    centre: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

    @classmethod
    def box(cls, shape: Sequence[int]) -> ScanFrame:
        """The frame of a scan whose body is all of it."""
        n = np.asarray(shape, dtype=float)
        return cls._make(n / 2 - 0.5, np.diag(1 / np.sqrt((n**2 - 1).clip(min=1) / 12)))

    @classmethod
    def of(cls, body: np.ndarray | Tensor) -> ScanFrame:
        """The frame of a body mask (X, Y, Z): centre, principal axes (or the scan's axes, see above), spread."""
        body = np.asarray(body.cpu() if isinstance(body, Tensor) else body, dtype=bool)
        points = np.argwhere(body)
        if len(points) < 8:
            return cls.box(body.shape)
        if len(points) > MAX_FRAME_VOXELS:
            points = points[:: math.ceil(len(points) / MAX_FRAME_VOXELS)]
        points = points.astype(np.float64)
        centre = points.mean(0)
        covariance = np.cov((points - centre).T) + np.eye(3) / 12  # + a voxel's own spread
        variances, vectors = np.linalg.eigh(covariance)
        axis_of = [int(np.argmax(np.abs(vectors[:, i]))) for i in range(3)]  # each principal axis: nearest scan axis
        rotation = np.zeros((3, 3))
        spread = np.zeros(3)
        for i, axis in enumerate(axis_of):
            rotation[axis] = vectors[:, i] * np.sign(vectors[axis, i])
            spread[axis] = np.sqrt(variances[i])
        sorted_variances = np.sort(variances)
        distinct = np.all(sorted_variances[1:] > DISTINCT_SPREAD_RATIO**2 * sorted_variances[:-1])
        angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
        if sorted(axis_of) != [0, 1, 2] or not distinct or angle > MAX_ROTATION_DEGREES:
            return cls._make(centre, np.diag(1 / np.sqrt(np.diag(covariance))))
        return cls._make(centre, np.diag(1 / spread) @ rotation)

    @classmethod
    def _make(cls, centre: np.ndarray, axes: np.ndarray) -> ScanFrame:
        return cls(tuple(float(c) for c in centre), tuple(tuple(float(v) for v in row) for row in axes))

    @classmethod
    def from_dict(cls, state: dict) -> ScanFrame:
        return cls._make(np.asarray(state["centre"]), np.asarray(state["axes"]))

    def to_dict(self) -> dict:
        return {"centre": list(self.centre), "axes": [list(row) for row in self.axes]}

    @property
    def extent(self) -> tuple[float, float, float]:
        """The body's spread along each frame axis (voxels), sorted: how much of a body the scan covers."""
        return tuple(sorted(float(1 / np.linalg.norm(row)) for row in self.axes))

    def grid_coordinates(self, points: Tensor) -> Tensor:
        """Voxel positions (N, 3) -> positions on the prior's grid (N, 3), [-1, 1] over +-POSITION_EXTENT."""
        axes = torch.tensor(self.axes, dtype=torch.float64, device=points.device)
        centre = torch.tensor(self.centre, dtype=torch.float64, device=points.device)
        return ((points.double() - centre) @ axes.T / POSITION_EXTENT).float()

    def coordinates(self, lower: Sequence[int], size: Sequence[int], device: torch.device | str | None = None
                    ) -> Tensor:
        """(3, *size) grid coordinates of the window of `size` voxels starting at voxel `lower` (may be outside)."""
        axes1d = [lo + torch.arange(n, device=device, dtype=torch.float64) for lo, n in zip(lower, size)]
        points = torch.stack(torch.meshgrid(*axes1d, indexing="ij"), -1).reshape(-1, 3)
        return self.grid_coordinates(points).T.reshape(3, *size)


def scan_coordinates(shape: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """(3, X, Y, Z) grid coordinates of a whole scan whose body is all of it (ScanFrame.box)."""
    return ScanFrame.box(shape).coordinates((0, 0, 0), shape, device)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, X, Y, Z), zero outside the grid."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    x = x.unsqueeze(1)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        padding = [0, 0, 0]
        padding[axis] = r
        x = F.conv3d(x, g.view(shape), padding=padding)
    return x.squeeze(1)


@torch.no_grad()
def _occupancy(points: Tensor, weights: Tensor, frame: ScanFrame, grid: int) -> Tensor:
    """(G, G, G) sum of `weights` of the voxels at `points` (N, 3) in each cell of the frame's grid."""
    cells = torch.floor((frame.grid_coordinates(points) + 1) / 2 * grid).long()
    inside = ((cells >= 0) & (cells < grid)).all(1)
    cells, weights = cells[inside], weights[inside]
    index = (cells[:, 0] * grid + cells[:, 1]) * grid + cells[:, 2]
    return torch.bincount(index, weights.float(), minlength=grid**3).float().view(grid, grid, grid)


def _peak_one(prior: Tensor, sigma: float) -> Tensor:
    prior = _blur(prior, sigma)
    return prior / prior.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]


@torch.no_grad()
def position_prior(masks: Tensor, grid: int, frames: Sequence[ScanFrame] | None = None,
                   sigma: float = POSITION_SIGMA_CELLS) -> Tensor:
    """Masks (B, K, X, Y, Z) over WHOLE scans -> (B, K, G, G, G): each class's occupancy of a G^3 grid laid over its
    scan's frame (one per scan; default ScanFrame.box), blurred by `sigma` cells and scaled to peak 1 (all 0 where a
    mask is empty)."""
    if masks.dim() != 5:
        raise ValueError(f"masks must be (B, K, X, Y, Z), got {tuple(masks.shape)}")
    b, k = masks.shape[:2]
    out = []
    for i in range(b):
        frame = frames[i] if frames is not None else ScanFrame.box(masks.shape[2:])
        cells = []
        for j in range(k):
            points = torch.nonzero(masks[i, j])
            cells.append(_occupancy(points, masks[i, j][tuple(points.T)], frame, grid))
        out.append(_peak_one(torch.stack(cells).to(masks.device), sigma))
    return torch.stack(out)


@torch.no_grad()
def position_prior_from_labels(labels: Tensor, values: Sequence[int], grid: int, frame: ScanFrame | None = None,
                               sigma: float = POSITION_SIGMA_CELLS) -> Tensor:
    """Label map (X, Y, Z) of a whole scan -> (K, G, G, G) priors of the label `values` in the scan's frame."""
    frame = frame or ScanFrame.box(labels.shape)
    cells = []
    for value in values:
        points = torch.nonzero(labels == int(value))
        cells.append(_occupancy(points, torch.ones(len(points)), frame, grid))
    return _peak_one(torch.stack(cells), sigma)


def sample_prior(prior: Tensor, coordinates: Tensor) -> Tensor:
    """prior (B or 1, K, G, G, G), grid coordinates (B, 3, X, Y, Z) -> (B, K, X, Y, Z), trilinear; 0 off the grid."""
    b = coordinates.shape[0]
    if prior.device.type == "cpu":
        return torch.stack([_trilinear_on_cpu(prior[i if prior.shape[0] > 1 else 0], coordinates[i])
                            for i in range(b)])
    # grid_sample's last axis indexes (W, H, D) = the grid's (axis 2, 1, 0); align_corners=False: cell j's centre
    # is at (2j + 1) / G - 1, as _occupancy bins it
    grid = coordinates.flip(1).permute(0, 2, 3, 4, 1).to(prior.dtype)
    return F.grid_sample(prior.expand(b, -1, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


# points per sparse interpolation matrix (its indices and weights: 96 bytes a point)
SPARSE_SAMPLE_POINTS = 2**18


@torch.no_grad()
def _trilinear_on_cpu(prior: Tensor, coordinates: Tensor) -> Tensor:
    """sample_prior of one scan on the CPU: prior (K, G, G, G), coordinates (3, X, Y, Z) -> (K, X, Y, Z).

    grid_sample's 3-D kernel is a scalar loop on the CPU (85 brain classes over a 1.5 mm brain: 2.3 s). Here each
    point's 8 corner weights form a row of a sparse matrix that multiplies the prior laid out as (cells, K): equal to
    grid_sample (bilinear, zeros, align_corners=False) to float rounding (3e-7), 2.4x faster at 85 classes."""
    k, *grid = prior.shape
    size = torch.tensor(grid, dtype=torch.float32).view(3, 1)
    # (cells, K), zeros one cell around the grid (corners off it read them): a point's corners read contiguous rows.
    # Laid out in one copy: it is made again for every slab of add_position_logits
    table = prior.new_zeros(grid[0] + 2, grid[1] + 2, grid[2] + 2, k, dtype=torch.float32)
    table[1:-1, 1:-1, 1:-1] = prior.permute(1, 2, 3, 0)
    table = table.view(-1, k)
    strides = torch.tensor([(grid[1] + 2) * (grid[2] + 2), grid[2] + 2, 1])
    offsets = torch.tensor([dz * strides[0] + dy * strides[1] + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])
    points = coordinates.reshape(3, -1).float()
    out = torch.empty(points.shape[1], k)
    with torch.autocast("cpu", enabled=False):
        for lo in range(0, points.shape[1], SPARSE_SAMPLE_POINTS):
            # a cell's centre is at (2j + 1) / G - 1 (align_corners=False); farther than one cell off the grid a point
            # reads zeros only, so it is clamped there
            u = torch.minimum((points[:, lo:lo + SPARSE_SAMPLE_POINTS] + 1) * size / 2 - 0.5, size).clamp_min_(-1)
            u = u.nan_to_num_(-1)  # indices are not checked: every corner must lie in the padded grid
            below = torch.minimum(u.floor(), size - 1)
            fraction = u - below
            first = ((below.long() + 1) * strides.view(3, 1)).sum(0)
            w = torch.stack([1 - fraction, fraction], 1)  # (3, 2, n)
            weights = (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None]).reshape(8, -1).T.reshape(-1)
            n = first.shape[0]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                matrix = torch.sparse_csr_tensor(torch.arange(0, 8 * n + 1, 8),
                                                 (first[:, None] + offsets).reshape(-1), weights,
                                                 (n, table.shape[0]), check_invariants=False)
            out[lo:lo + n] = matrix @ table
    return out.T.reshape(k, *coordinates.shape[1:])
