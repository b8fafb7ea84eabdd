"""Episodic batches for Iris: a query patch and a reference patch from ANOTHER case of the SAME member.

nnU-Net's `nnUNetDataLoader` draws single patches; Iris needs pairs that share a sampled set of classes, so the
batch assembly is ours, while patch placement (`get_bbox`), case loading and augmentation are nnU-Net's.
One episode (= one batch) comes from one member and shares its classes: mostly K_max labels, otherwise 1..K_max,
drawn at random (random class dropping), each turned into a binary target channel. In co-located episodes every
crop of the episode (queries and references) is centred on one anchor class and the other classes are drawn from
those the first query crop holds, so that the episode's crops show the same anatomy.

So that the network segments whatever a reference marks, not only its training labels, two more kinds of episode:
*augmented* ones, whose tasks are partly made from the labels (unions of neighbouring classes, one side of a
structure, the whole body, a region above an intensity), and *self-supervised* ones, two overlapping crops of the
same scan with supervoxels as the masks, which need no labels at all (members with images only have just these).
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

from iris_nnu.inference.alignment import AlignmentAnchor, aligned_frame, alignment_anchor
from iris_nnu.preprocessing.frames import body_frame
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
    held_out: tuple[int, ...] = ()  # label values never drawn as a task (to measure structures never trained on)
    # this member's shares of self-supervised and augmented episodes; None: the loader's
    self_supervised_p: float | None = None
    augmented_p: float | None = None
    # the member's preprocessed voxel size (mm) when every case's frame is registered to the member's template case
    # (plans' iris.prior_alignment "affine"); None: each case keeps its own body frame
    alignment_spacing: tuple[float, float, float] | None = None

    @property
    def foreground_labels(self) -> list[int]:
        """The label values episodes draw as tasks."""
        return [v for v in foreground_labels(self.labels) if v not in self.held_out]


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
                 oversample_foreground_percent: float = 0.67, seed: int | None = None, position_grid: int = 0,
                 weak_reference_transforms=None, self_supervised_p: float = 0.0, augmented_p: float = 0.0,
                 permute_axes: bool = False):
        super().__init__(members, batch_size, 1, None, True, False, True)
        self.members = [m for m in members if m.query_cases]
        if not self.members:
            raise ValueError("no member has query cases for episodes")
        weights = np.array([m.weight for m in self.members], dtype=float)
        self.member_probabilities = weights / weights.sum()
        self.max_classes = max_classes
        self.query_transforms = query_transforms
        self.reference_transforms = reference_transforms
        # self-supervised episodes: the reference crop of the query's own scan, augmented only by these
        self.weak_reference_transforms = weak_reference_transforms or reference_transforms
        self.final_patch_size = tuple(int(p) for p in patch_size)
        self.self_supervised_p = self_supervised_p
        self.augmented_p = augmented_p
        self.mirror_axes = tuple(mirror_axes)
        # axes that may trade places (equal patch sides): query and reference permuted together, so that the network
        # learns anatomy in every voxel order, as it learns both sides by mirroring
        sides = self.final_patch_size
        self.permutable_axes = tuple(a for a in range(len(sides)) if sides.count(sides[a]) > 1) if permute_axes else ()
        self.oversample_foreground_percent = oversample_foreground_percent
        self.rng = np.random.default_rng(seed)
        self.position_grid = position_grid
        self._priors: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (member, case) -> {label: (G,G,G)}
        self._frames: dict[tuple[str, str], ScanFrame] = {}  # (member, case) -> where its body lies
        self._templates: dict[str, AlignmentAnchor] = {}  # member -> its template case (prior_alignment "affine")
        self._body_priors: dict[tuple[str, str], torch.Tensor] = {}  # (member, case) -> (G, G, G)
        self._centroid_cache: dict[tuple[str, str, int], torch.Tensor] = {}  # (member, case, class) -> (3,)
        # nnU-Net's loaders, one per member: their dataset and patch placement (padding, foreground centring)
        self.samplers = {}
        self.datasets: dict[str, nnUNetDatasetBlosc2] = {}  # our own handle on each member's cases
        for m in self.members:
            cases = sorted(set(m.query_cases) | set(m.reference_cases))
            dataset = self.datasets[m.name] = nnUNetDatasetBlosc2(m.folder, cases)
            self.samplers[m.name] = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size,
                                                     LabelManager(m.labels, None), oversample_foreground_percent)

    def _crop(self, member: MemberEpisodes, case: str, classes: list[int], force_fg: bool, off_anchor_p: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """A patch of the case (image, label map, whether it was placed on a class, its voxels' scan coordinates),
        centred on a voxel of one of `classes` when forced; with `off_anchor_p`, placed anywhere instead with that
        probability where the case is larger than the patch."""
        sampler = self.samplers[member.name]
        data, seg, _, properties = self._load(member, case)
        if off_anchor_p and any(s > p for s, p in zip(data.shape[1:], sampler.patch_size)):
            force_fg = force_fg and self.rng.random() >= off_anchor_p
        locations = {c: properties["class_locations"][c] for c in classes
                     if len(properties["class_locations"].get(c, [])) > 0}
        lbs, ubs = sampler.get_bbox(data.shape[1:], force_fg and bool(locations), locations or None)
        bbox = [[lo, hi] for lo, hi in zip(lbs, ubs)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        labels = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        coordinates = self._frame(member, case, seg).coordinates(lbs, [hi - lo for lo, hi in zip(lbs, ubs)])
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

    # ------------------------------------------------------------------------------------------- episodes
    def generate_train_batch(self) -> dict:
        member = self.members[self.rng.choice(len(self.members), p=self.member_probabilities)]
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            self_supervised_p = self.self_supervised_p if member.self_supervised_p is None else member.self_supervised_p
            if not member.foreground_labels or self.rng.random() < self_supervised_p:
                kind, items = "self-supervised", [self._self_supervised_item(member) for _ in range(self.batch_size)]
            else:
                kind, items = self._supervised_items(member)
            return self._assemble(member, kind, items)

    def _supervised_items(self, member: MemberEpisodes) -> tuple[str, list[EpisodeItem]]:
        """Crops of labelled cases; the masks are label classes, or with `augmented_p` partly tasks made from them."""
        anchor = int(self.rng.choice(member.foreground_labels)) if self.rng.random() < COLOCATED_P else None
        classes = self._episode_classes(member) if anchor is None else [anchor]
        crops = []
        for b in range(self.batch_size):
            query = str(self.rng.choice(member.query_cases))
            force = anchor is not None or self.rng.random() < self.oversample_foreground_percent
            off_anchor = OFF_ANCHOR_P if anchor is not None and b > 0 else 0.0
            crops.append((query, *self._crop(member, query, classes, force, off_anchor)))
        held = [int(c) for c in np.unique(crops[0][2]) if c > 0 and int(c) in member.foreground_labels]
        if anchor is not None:  # the anchor and others that the first query crop holds
            others = [c for c in held if c != anchor]
            size = self._episode_size(min(self.max_classes, len(member.foreground_labels)))
            classes += [int(c) for c in self.rng.choice(others, size=min(size - 1, len(others)), replace=False)]
        classes = sorted(int(c) for c in classes)
        kind, specs = "labels", [MaskSpec("label", (c,)) for c in classes]
        augmented_p = self.augmented_p if member.augmented_p is None else member.augmented_p
        if self.rng.random() < augmented_p:
            kind, specs = "augmented", self._augmented_specs(classes, crops[0][2])
        centre_on = classes if anchor is None else [anchor]
        items = []
        for query, q_image, q_labels, _, q_coordinates in crops:
            for _ in range(REFERENCE_ATTEMPTS):  # a reference crop must contain the structure
                reference = self._reference_case(member, query)
                r_image, r_labels, has_class, r_coordinates = self._crop(member, reference, centre_on, True)
                if has_class:
                    break
            items.append(EpisodeItem((query, reference), specs, q_image, q_labels, q_coordinates, r_image, r_labels,
                                     r_coordinates, self._priors_for(member, reference, specs)))
        return kind, items

    def _augmented_specs(self, classes: list[int], first_query_labels: torch.Tensor) -> list[MaskSpec]:
        """Task augmentation: some of the episode's classes replaced by tasks made from the labels (a union of two
        neighbouring classes, one side of a structure cut by a plane, the whole body, a region above an intensity),
        so that the network learns to segment whatever the reference marks, not the training sets' vocabulary."""
        kept = list(classes)
        self.rng.shuffle(kept)
        specs: list[MaskSpec] = []
        made = int(self.rng.integers(1, min(self.max_classes, len(classes) + 1) + 1))
        kinds = list(AUGMENTED_TASKS)
        for _ in range(made):
            kind = str(self.rng.choice(kinds))
            if kind == "union" and len(kept) >= 2:
                a = kept.pop()
                b = _neighbour(first_query_labels, a, kept, self.rng)
                kept.remove(b)
                specs.append(MaskSpec("union", (a, b)))
            elif kind == "part" and kept:
                specs.append(MaskSpec("part", (kept.pop(),), axis=int(self.rng.integers(3)),
                                      below=bool(self.rng.random() < 0.5)))
            elif kind == "body" and all(s.kind != "body" for s in specs):
                specs.append(MaskSpec("body"))
            elif kind == "threshold":
                used = {s.threshold for s in specs if s.kind == "threshold"}
                free = [t for t in THRESHOLDS if t not in used]
                if free:
                    specs.append(MaskSpec("threshold", threshold=float(self.rng.choice(free))))
        specs += [MaskSpec("label", (c,)) for c in kept[:max(0, self.max_classes - len(specs))]]
        return specs or [MaskSpec("label", (classes[0],))]

    def _self_supervised_item(self, member: MemberEpisodes) -> EpisodeItem:
        """Two overlapping crops of ONE scan (labelled or not, as the authors' later MASS code): the masks are
        supervoxels of the region both crops cover (SLIC), so query and reference show the same regions; the
        reference is augmented weakly (no spatial or intensity transforms), the query as any."""
        sampler = self.samplers[member.name]
        case = str(self.rng.choice(member.query_cases))
        data, seg, _, _ = self._load(member, case)
        frame = self._frame(member, case, seg)
        shape, initial = np.array(data.shape[1:]), np.array(sampler.patch_size)
        final = np.array(self.final_patch_size)
        q_lo = np.array(sampler.get_bbox(data.shape[1:], False, None)[0])
        q_centre = q_lo + initial // 2
        # reference window (final size): centres at most a third of a patch apart per axis, >= 2/3 overlap
        shift = self.rng.integers(-(final // 3), final // 3 + 1)
        r_lo = np.clip(q_centre + shift, final // 2, np.maximum(shape - (final - final // 2), final // 2)) - final // 2
        q_box = (q_lo, q_lo + initial)
        r_box = (r_lo, r_lo + final)
        lo, hi = np.minimum(q_box[0], r_box[0]), np.maximum(q_box[1], r_box[1])
        box = [[int(a), int(b)] for a, b in zip(lo, hi)]
        image = crop_and_pad_nd(data, box, 0)
        labels = crop_and_pad_nd(seg, box, -1, cast_cropped_to=np.int16)[0]
        regions = supervoxels(image[0], labels >= 0, final, self.rng)
        regions[labels < 0] = -1

        def cut(array: np.ndarray, window: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return array[(..., *(slice(int(a - l), int(b - l)) for a, b, l in zip(*window, lo)))]

        q_regions, r_regions = cut(regions, q_box), cut(regions, r_box)
        # regions both crops hold well enough to be a task
        counts_q = np.bincount(q_regions[q_regions > 0].ravel(), minlength=regions.max() + 1)
        counts_r = np.bincount(r_regions[r_regions > 0].ravel(), minlength=regions.max() + 1)
        both = np.flatnonzero((counts_q >= MIN_REGION_VOXELS) & (counts_r >= MIN_REGION_VOXELS))
        chosen = self.rng.choice(both, size=min(self.max_classes, len(both)), replace=False) if len(both) else []
        specs = [MaskSpec("label", (int(r),)) for r in sorted(chosen)] or [MaskSpec("body")]
        # a flat prior (log(1 + 0.01) ~ 0 everywhere): both crops come from one scan, so where a supervoxel lies in
        # it would give the query its answer, and the network would learn to trust the prior over the reference
        priors = torch.ones(len(specs), *(self.position_grid,) * 3) if self.position_grid else None
        return EpisodeItem((case, case), specs,
                           torch.from_numpy(cut(image, q_box)).float(),
                           torch.from_numpy(q_regions[None].copy()).to(torch.int16),
                           frame.coordinates(q_lo, initial),
                           torch.from_numpy(cut(image, r_box)).float(),
                           torch.from_numpy(r_regions[None].copy()).to(torch.int16),
                           frame.coordinates(r_lo, final), priors, weak_reference=True)

    def _axis_order(self) -> tuple[int, ...] | None:
        """A random order of a (C, X, Y, Z) tensor's dimensions that shuffles the permutable axes, or None."""
        if len(self.permutable_axes) < 2:
            return None
        spatial = list(range(len(self.final_patch_size)))
        shuffled = self.rng.permutation(self.permutable_axes)
        for a, b in zip(self.permutable_axes, shuffled):
            spatial[a] = int(b)
        return None if spatial == sorted(spatial) else (0, *(a + 1 for a in spatial))

    def _assemble(self, member: MemberEpisodes, kind: str, items: list[EpisodeItem]) -> dict:
        """Augment each item and turn its mask specs into binary targets and reference masks."""
        k = max(len(item.specs) for item in items)
        queries, references, targets, masks, keys, coordinates, priors = [], [], [], [], [], [], []
        for item in items:
            # the coordinates, the raw image (for threshold tasks) and the body travel as nnU-Net's regression
            # target: spatially augmented with the image, untouched by the intensity transforms
            q = self.query_transforms(image=item.query_image, segmentation=item.query_labels,
                                      regression_target=_extras(item.query_coordinates, item.query_image,
                                                                item.query_labels))
            transforms = self.weak_reference_transforms if item.weak_reference else self.reference_transforms
            r = transforms(image=item.reference_image, segmentation=item.reference_labels,
                           regression_target=_extras(item.reference_coordinates, item.reference_image,
                                                     item.reference_labels))
            q_seg = q["segmentation"] if isinstance(q["segmentation"], list) else [q["segmentation"]]
            # mirror query and reference together: left/right structures must keep their side relative
            # to the reference
            flip = [a + 1 for a in self.mirror_axes if self.rng.random() < 0.5]
            q_img, r_img, r_seg, q_extra, r_extra = (q["image"], r["image"], r["segmentation"],
                                                      q["regression_target"], r["regression_target"])
            if flip:  # the coordinates flip too: every voxel keeps its own position (and the prior its side)
                q_img, r_img, r_seg, q_extra, r_extra = (t.flip(flip) for t in (q_img, r_img, r_seg, q_extra, r_extra))
                q_seg = [t.flip(flip) for t in q_seg]
            order = self._axis_order()
            if order is not None:  # voxels move, the coordinates' values do not: the prior still meets each voxel
                q_img, r_img, r_seg, q_extra, r_extra = (t.permute(order) for t in (q_img, r_img, r_seg, q_extra,
                                                                                    r_extra))
                q_seg = [t.permute(order) for t in q_seg]
            centroids = self._centroids(member, item.keys, item.specs)
            q_masks = _spec_masks(item.specs, q_seg[0][0], q_extra, centroids[0], k)
            targets.append([q_masks] + [F.interpolate(q_masks[None], tuple(s.shape[1:]), mode="nearest-exact")[0]
                                        for s in q_seg[1:]])
            masks.append(_spec_masks(item.specs, r_seg[0], r_extra, centroids[1], k))
            queries.append(q_img)
            references.append(r_img)
            coordinates.append(q_extra[:3])
            keys.append(item.keys)
            if self.position_grid:
                prior = item.priors
                if prior.shape[0] < k:
                    prior = torch.cat([prior, prior.new_zeros(k - prior.shape[0], *prior.shape[1:])])
                priors.append(prior)
        reference_masks = perturb_masks(torch.stack(masks), self.rng)
        target = [torch.stack([t[i] for t in targets]) for i in range(len(targets[0]))]
        specs = items[0].specs
        # label values where every item's mask j is that label (the memory bank's key), else -j-1: a made-up task
        classes = [s.values[0] if kind == "labels" and s.kind == "label" else -j - 1 for j, s in enumerate(specs)]
        classes += [-j - 1 for j in range(len(classes), k)]
        return {
            "data": torch.stack(queries),
            "target": target if len(target) > 1 else target[0],
            "reference": torch.stack(references),
            "reference_masks": reference_masks,
            "present": reference_masks.flatten(2).amax(2) > 0,
            "classes": classes,
            "member": member.name,
            "kind": kind,
            "keys": keys,
            "coordinates": torch.stack(coordinates),
            "reference_positions": torch.stack(priors) if priors else None,
        }

    # ---------------------------------------------------------------------------------- per-case caches
    def _load(self, member: MemberEpisodes, case: str):
        return self.datasets[member.name].load_case(case)

    def _frame(self, member: MemberEpisodes, case: str, seg) -> ScanFrame:
        key = (member.name, case)
        if key not in self._frames:  # once per case
            self._frames[key] = body_frame(seg)
            if member.alignment_spacing is not None:
                # the frame that reads the template's grid where an affine registration puts each voxel: any two
                # cases then meet through two registrations, as a query meets its reference at inference
                data = np.asarray(self._load(member, case)[0])
                self._frames[key] = aligned_frame(data, self._frames[key], self._template(member))
            if self.position_grid and member.foreground_labels:
                self._priors[key] = dict(zip(member.foreground_labels, position_prior_from_labels(
                    torch.from_numpy(np.asarray(seg[0])), member.foreground_labels, self.position_grid,
                    self._frames[key])))
        return self._frames[key]

    def _template(self, member: MemberEpisodes) -> AlignmentAnchor:
        """The member's template: its first reference case by name, with its own body frame."""
        if member.name not in self._templates:
            case = sorted(member.reference_cases)[0]
            data, seg, _, _ = self._load(member, case)
            self._templates[member.name] = alignment_anchor(np.asarray(data), body_frame(seg),
                                                            member.alignment_spacing)
        return self._templates[member.name]

    def _body_prior(self, member: MemberEpisodes, case: str) -> torch.Tensor:
        """(G, G, G) where the scan's body lies in its frame (the prior of whole-body and intensity tasks); once per
        case."""
        key = (member.name, case)
        if key not in self._body_priors:
            _, seg, _, _ = self._load(member, case)
            body = torch.from_numpy((np.asarray(seg[0]) >= 0).astype(np.int16))
            self._body_priors[key] = position_prior_from_labels(body, [1], self.position_grid,
                                                                self._frame(member, case, seg))[0]
        return self._body_priors[key]

    def _priors_for(self, member: MemberEpisodes, case: str, specs: list[MaskSpec]) -> torch.Tensor | None:
        """(K, G, G, G) priors of the specs in the reference case (made-up tasks: from their labels' priors)."""
        if not self.position_grid:
            return None
        labels = self._priors[(member.name, case)]
        out = []
        for s in specs:
            if s.kind in ("label", "part"):
                out.append(labels[s.values[0]])
            elif s.kind == "union":
                out.append(torch.maximum(labels[s.values[0]], labels[s.values[1]]))
            else:
                out.append(self._body_prior(member, case))
        return torch.stack(out)

    def _centroids(self, member: MemberEpisodes, keys: tuple[str, str], specs: list[MaskSpec]
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per case of (query, reference): the frame coordinates of the centroid of each class a 'part' task cuts."""
        cut = [s.values[0] for s in specs if s.kind == "part"]
        out = []
        for case in keys:
            missing = [c for c in cut if (member.name, case, c) not in self._centroid_cache]
            if missing:  # each (case, class) once: the case is loaded only for centroids not yet known
                _, seg, _, properties = self._load(member, case)
                frame = self._frame(member, case, seg)
                for c in missing:
                    points = np.asarray(properties["class_locations"].get(c, [])).reshape(-1, 4)[:, 1:]
                    # a class the case lacks has an empty mask on either side
                    self._centroid_cache[(member.name, case, c)] = \
                        frame.grid_coordinates(torch.as_tensor(points)).mean(0) if len(points) else torch.zeros(3)
            out.append({c: self._centroid_cache[(member.name, case, c)] for c in cut})
        return out[0], out[1]


# ---------------------------------------------------------------------------------------- episode parts
# Share of a labelled member's episodes that are self-supervised, and of its other episodes whose tasks are partly
# made from the labels (task augmentation); members without labels have only self-supervised episodes.
SELF_SUPERVISED_P = 0.25
AUGMENTED_P = 0.25
AUGMENTED_TASKS = ("union", "part", "body", "threshold")
# Threshold tasks: the body above this normalised intensity (z-scored MR, CT on its HU window), the same in both crops
THRESHOLDS = (-0.5, 0.0, 0.5, 1.0)
# A supervoxel is a task only where both crops hold at least this many of its voxels.
MIN_REGION_VOXELS = 64
# Supervoxels about (patch / REGION_SCALE)^3 voxels each: about 2.5^3 = 16 regions per window.
REGION_SCALE = 2.5
SLIC_COMPACTNESS = 0.1


@dataclass(frozen=True)
class MaskSpec:
    """How one binary task of an episode is made from a crop: 'label' (value), 'union' (two values), 'part' (the
    side `below` or above the class centroid along frame `axis`), 'body', 'threshold' (body above `threshold`)."""

    kind: str
    values: tuple[int, ...] = ()
    axis: int = 0
    below: bool = True
    threshold: float = 0.0


@dataclass
class EpisodeItem:
    """One (query, reference) pair of an episode before augmentation; `priors` (K, G, G, G) in the reference scan."""

    keys: tuple[str, str]
    specs: list[MaskSpec]
    query_image: torch.Tensor
    query_labels: torch.Tensor
    query_coordinates: torch.Tensor
    reference_image: torch.Tensor
    reference_labels: torch.Tensor
    reference_coordinates: torch.Tensor
    priors: torch.Tensor | None
    weak_reference: bool = False


def supervoxels(image: np.ndarray, body: np.ndarray, patch, rng: np.random.Generator) -> np.ndarray:
    """SLIC supervoxels (1..n; 0 outside `body`) of a preprocessed image region, about (patch / REGION_SCALE)^3
    voxels each (scikit-image's slic, the automatic masks of self-supervised episodes)."""
    from skimage.segmentation import slic

    if body.sum() < MIN_REGION_VOXELS:
        return np.zeros(image.shape, dtype=np.int16)
    size = float(np.prod(np.asarray(patch, dtype=float) / REGION_SCALE))
    n = int(max(2, round(body.sum() / size * rng.uniform(0.6, 1.6))))
    regions = slic(image.astype(np.float64), n_segments=n, compactness=SLIC_COMPACTNESS, mask=body,
                   channel_axis=None, start_label=1, max_num_iter=5)
    return regions.astype(np.int16)


def _extras(coordinates: torch.Tensor, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(5, X, Y, Z): scan coordinates, the first image channel before intensity augmentation, the body (0/1)."""
    return torch.cat([coordinates, image[:1].float(), (labels[:1] >= 0).float()])


def _spec_masks(specs: list[MaskSpec], labels: torch.Tensor, extras: torch.Tensor, centroids: dict[int, torch.Tensor],
                k: int) -> torch.Tensor:
    """(k, X, Y, Z) binary masks of the specs in an augmented crop (label map, `_extras`), zero-padded to k."""
    body = extras[4] > 0.5
    out = torch.zeros(k, *labels.shape)
    for j, s in enumerate(specs):
        if s.kind == "label":
            mask = labels == s.values[0]
        elif s.kind == "union":
            mask = (labels == s.values[0]) | (labels == s.values[1])
        elif s.kind == "part":
            side = extras[s.axis] < float(centroids[s.values[0]][s.axis])
            mask = (labels == s.values[0]) & (side if s.below else ~side)
        elif s.kind == "body":
            mask = body
        else:
            mask = body & (extras[3] > s.threshold)
        out[j] = mask.float()
    return out


def _neighbour(labels: torch.Tensor, a: int, candidates: list[int], rng: np.random.Generator) -> int:
    """A class of `candidates` that touches class `a` in the crop (one voxel apart), else any of them."""
    grown = F.max_pool3d((labels == a).float()[None], 3, stride=1, padding=1)[0] > 0
    touching = [c for c in candidates if bool((grown & (labels == c)).any())]
    return int(rng.choice(touching or candidates))
