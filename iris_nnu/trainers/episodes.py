"""Episodic batches for Iris: a query patch and a reference patch from ANOTHER case of the SAME member.

nnU-Net's `nnUNetDataLoader` draws single patches; Iris needs pairs that share a sampled set of classes, so the
batch assembly is ours, while patch placement (`get_bbox`), case loading and augmentation are nnU-Net's.
One episode (= one batch) comes from one member and shares its classes: mostly K_max labels, otherwise 1..K_max,
drawn at random (random class dropping), each turned into a binary target channel. In co-located episodes every
crop of the episode (queries and references) is centred on one anchor class and the other classes are drawn from
those the first query crop holds, so that the episode's crops show the same anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

from iris_nnu.inference.plans import body_frame
from iris_nnu.model.position import ScanFrame, position_prior_from_labels
from iris_nnu.preprocessing.raw_dataset import foreground_labels

# Reference perturbation (imperfect references): probability of dilating or eroding the reference masks.
REFERENCE_MASK_PERTURBATION_P = 0.3
# Share of episodes that draw as many of the member's classes as allowed; the others draw 1..K_max uniformly
# (random class dropping). The query pass is shared by all classes of an episode, so more classes give more signal
# per step; and episodes of one class reward a shortcut (the class carried by the shared image update instead of
# the per-class vector) that merged classes decoded together (issue 10).
FULL_EPISODE_P = 0.75
# Share of co-located episodes. Where a scan is much larger than the patch (a whole brain in a 32^3 patch), classes
# drawn from the whole member scatter over the scan: the query crop holds few of them and the reference crop (centred
# on one of them, in another case) others, so most (class, crop) pairs carry no foreground and the network learns to
# predict nothing (issue 10: the default model's OASIS Dice 0.004). Crops of small scans hold every class anyway.
COLOCATED_P = 0.75
# Share of a co-located episode's query crops after the first that are placed anywhere in the scan instead of on
# the anchor: centred crops always hold the structure, so without these the network never sees a window without it,
# and in a whole brain it marks look-alike tissue in every window (issue 10: caudate 31k voxels predicted, 1k true).
OFF_ANCHOR_P = 0.5
# Attempts to find a reference case that holds at least one of the episode's classes.
REFERENCE_ATTEMPTS = 5


@dataclass
class MemberEpisodes:
    """Where one member's episodes come from."""

    name: str
    folder: str  # preprocessed IrisPlans_3d_fullres folder
    labels: dict[str, int]
    query_cases: list[str]
    reference_cases: list[str]
    weight: float = 1.0

    @property
    def foreground_labels(self) -> list[int]:
        return foreground_labels(self.labels)


def perturb_masks(masks: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """Randomly dilate or erode each reference's masks by one voxel (B,K,X,Y,Z), simulating imperfect references."""
    out = masks.clone()
    for b in range(masks.shape[0]):
        roll = generator.random()
        if roll < REFERENCE_MASK_PERTURBATION_P / 2:
            out[b] = F.max_pool3d(masks[b:b + 1], 3, stride=1, padding=1)[0]
        elif roll < REFERENCE_MASK_PERTURBATION_P:
            eroded = -F.max_pool3d(-masks[b:b + 1], 3, stride=1, padding=1)[0]
            keep = eroded.flatten(1).sum(1) > 0  # never erode a small structure away
            out[b, keep] = eroded[keep]
    return out


class EpisodicDataLoader(DataLoader):
    """Yields episodes: {'data', 'target', 'reference', 'reference_masks', 'present', 'classes', 'member', 'keys',
    'coordinates', 'reference_positions'}.

    `target` is a list of (B,K,...) binary tensors per deep-supervision scale (or one tensor without it).
    `coordinates` (B,3,X,Y,Z): where each query voxel lies in its scan (augmented with the image);
    `reference_positions` (B,K,G,G,G): the classes' position priors in the whole reference scans (with
    `position_grid` > 0; else None).
    """

    def __init__(self, members: list[MemberEpisodes], batch_size: int, initial_patch_size, patch_size,
                 max_classes: int, query_transforms, reference_transforms, mirror_axes: tuple[int, ...] = (),
                 oversample_foreground_percent: float = 0.67, seed: int | None = None, position_grid: int = 0):
        super().__init__(members, batch_size, 1, None, True, False, True)
        self.members = [m for m in members if m.query_cases]
        if not self.members:
            raise ValueError("no member has query cases for episodes")
        weights = np.array([m.weight for m in self.members], dtype=float)
        self.member_probabilities = weights / weights.sum()
        self.max_classes = max_classes
        self.query_transforms = query_transforms
        self.reference_transforms = reference_transforms
        self.mirror_axes = tuple(mirror_axes)
        self.oversample_foreground_percent = oversample_foreground_percent
        self.rng = np.random.default_rng(seed)
        self.position_grid = position_grid
        self._priors: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (member, case) -> {label: (G,G,G)}
        self._frames: dict[tuple[str, str], ScanFrame] = {}  # (member, case) -> where its body lies
        # nnU-Net's loaders, one per member: their dataset and patch placement (padding, foreground centring)
        self.samplers = {}
        for m in self.members:
            cases = sorted(set(m.query_cases) | set(m.reference_cases))
            dataset = nnUNetDatasetBlosc2(m.folder, cases)
            self.samplers[m.name] = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size,
                                                     LabelManager(m.labels, None), oversample_foreground_percent)

    def _crop(self, member: MemberEpisodes, case: str, classes: list[int], force_fg: bool, off_anchor_p: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """A patch of the case (image, label map, whether it was placed on a class, its voxels' scan coordinates),
        centred on a voxel of one of `classes` when forced; with `off_anchor_p`, placed anywhere instead with that
        probability where the case is larger than the patch."""
        sampler = self.samplers[member.name]
        data, seg, _, properties = sampler._data.load_case(case)
        if off_anchor_p and any(s > p for s, p in zip(data.shape[1:], sampler.patch_size)):
            force_fg = force_fg and self.rng.random() >= off_anchor_p
        locations = {c: properties["class_locations"][c] for c in classes
                     if len(properties["class_locations"].get(c, [])) > 0}
        lbs, ubs = sampler.get_bbox(data.shape[1:], force_fg and bool(locations), locations or None)
        bbox = [[lo, hi] for lo, hi in zip(lbs, ubs)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        key = (member.name, case)
        if key not in self._frames:  # once per case
            scan_labels = torch.from_numpy(np.asarray(seg[0]))
            self._frames[key] = body_frame(seg)
            if self.position_grid:
                self._priors[key] = dict(zip(member.foreground_labels, position_prior_from_labels(
                    scan_labels, member.foreground_labels, self.position_grid, self._frames[key])))
        coordinates = self._frames[key].coordinates(lbs, [hi - lo for lo, hi in zip(lbs, ubs)])
        return image, labels, bool(locations), coordinates

    def _reference_case(self, member: MemberEpisodes, query: str) -> str:
        """Another case than the query (the same only if the member has no other)."""
        candidates = [c for c in member.reference_cases if c != query] or member.reference_cases
        return str(self.rng.choice(candidates))

    def _episode_classes(self, member: MemberEpisodes) -> list[int]:
        labels = member.foreground_labels
        k_max = min(self.max_classes, len(labels))
        return list(self.rng.choice(labels, size=self._episode_size(k_max), replace=False))

    def _episode_size(self, k_max: int) -> int:
        return k_max if self.rng.random() < FULL_EPISODE_P else int(self.rng.integers(1, k_max + 1))

    def generate_train_batch(self) -> dict:
        member = self.members[self.rng.choice(len(self.members), p=self.member_probabilities)]
        anchor = int(self.rng.choice(member.foreground_labels)) if self.rng.random() < COLOCATED_P else None
        classes = self._episode_classes(member) if anchor is None else [anchor]
        queries, references, targets, masks, keys = [], [], [], [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            crops = []
            for b in range(self.batch_size):
                query = str(self.rng.choice(member.query_cases))
                force = anchor is not None or self.rng.random() < self.oversample_foreground_percent
                off_anchor = OFF_ANCHOR_P if anchor is not None and b > 0 else 0.0
                image, labels, _, coordinates = self._crop(member, query, classes, force, off_anchor)
                crops.append((query, image, labels, coordinates))
            if anchor is not None:  # the anchor and others that the first query crop holds
                held = [int(c) for c in np.unique(crops[0][2]) if c > 0 and c != anchor]
                size = self._episode_size(min(self.max_classes, len(member.foreground_labels)))
                classes += [int(c) for c in self.rng.choice(held, size=min(size - 1, len(held)), replace=False)]
            classes = sorted(int(c) for c in classes)
            centre_on = classes if anchor is None else [anchor]
            priors, coordinates = [], []
            for query, q_image, q_labels, q_coordinates in crops:
                for _ in range(REFERENCE_ATTEMPTS):  # a reference crop must contain the structure
                    reference = self._reference_case(member, query)
                    r_image, r_labels, has_class, _ = self._crop(member, reference, centre_on, True)
                    if has_class:
                        break
                # the coordinates travel as nnU-Net's regression target: spatially augmented with the image, but
                # untouched by the intensity transforms
                q = self.query_transforms(image=q_image, segmentation=q_labels, regression_target=q_coordinates)
                r = self.reference_transforms(image=r_image, segmentation=r_labels)
                q_seg = q["segmentation"] if isinstance(q["segmentation"], list) else [q["segmentation"]]
                # mirror query and reference together: left/right structures must keep their side relative
                # to the reference
                flip = [a + 1 for a in self.mirror_axes if self.rng.random() < 0.5]
                q_img, r_img, r_seg, q_xyz = q["image"], r["image"], r["segmentation"], q["regression_target"]
                if flip:  # the coordinates flip too: every voxel keeps its own position (and the prior its side)
                    q_img, r_img, r_seg, q_xyz = q_img.flip(flip), r_img.flip(flip), r_seg.flip(flip), q_xyz.flip(flip)
                    q_seg = [s.flip(flip) for s in q_seg]
                coordinates.append(q_xyz)
                if self.position_grid:
                    priors.append(torch.stack([self._priors[(member.name, reference)][c] for c in classes]))
                class_values = torch.tensor(classes, dtype=q_seg[0].dtype).view(-1, 1, 1, 1)
                queries.append(q_img)
                references.append(r_img)
                targets.append([(s[0:1] == class_values).float() for s in q_seg])
                masks.append((r_seg[0:1] == class_values).float())
                keys.append((query, reference))
        reference_masks = perturb_masks(torch.stack(masks), self.rng)
        target = [torch.stack([t[i] for t in targets]) for i in range(len(targets[0]))]
        return {
            "data": torch.stack(queries),
            "target": target if len(target) > 1 else target[0],
            "reference": torch.stack(references),
            "reference_masks": reference_masks,
            "present": reference_masks.flatten(2).amax(2) > 0,
            "classes": classes,
            "member": member.name,
            "keys": keys,
            "coordinates": torch.stack(coordinates),
            "reference_positions": torch.stack(priors) if priors else None,
        }
