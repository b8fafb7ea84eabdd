"""ONE joint plan for a collection of datasets (nnU-Net plans schema, configuration `3d_fullres`).

nnU-Net plans each dataset alone; Iris trains one network on all members, so they must share the spacing,
the patch and the network. The rules, in order:

1. Target spacing (isotropic). `auto`: the median, over members, of each member's median voxel size expressed
   as an isotropic edge, (sx*sy*sz)^(1/3). An anisotropic 0.8x0.8x5 mm CT counts as 1.47 mm, a 1 mm MR as
   1 mm: the voxel count of each member is kept on average. (The Iris paper fixes 1.5 mm for its 12 datasets.)
2. Target patch: per axis, the largest member median shape at that spacing, rounded up to a multiple of the
   network's down-sampling factor and capped at 128 (the paper's patch).
3. Network and patch from the memory budget: for base widths 32, 24, 16, 8 (doubling per stage, 5 stages),
   shrink the patch (largest axis first, down to 64 per axis) until the model's memory estimate for one
   training step fits; the first width that fits wins. Then the batch grows from 2 while it still fits.
4. Normalisation per member by modality (see normalization.py); nnU-Net's rule for the non-zero mask.

Hardware. The rules above make the paper-like plan for a GPU (`hardware="gpu"`, or `auto` with a GPU visible).
For a CPU (`cpu`, or `auto` without a GPU) what is not given is chosen for learning per CPU-hour instead:
spacing no finer than 1.5 mm (the paper's), a fixed 32^3 patch and a 0.5 GB budget (widths 8..128). Measured on
2 cores (benchmarks/learning_curves.py, issue 10): the automatic 1 mm / 64^3 / widths 16..256 plan takes ~13 s
per iteration; 32^3 takes ~1.3 s, and after 300 iterations the hippocampus reached held-out one-shot Dice 0.50 at
1.5 mm against 0.34 at 2 mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from iris_nnu.model import IrisArchitecture, estimate_memory_bytes
from iris_nnu.preprocessing.normalization import normalization_for_channel

PLANS_IDENTIFIER = "IrisPlans"
CONFIGURATION = "3d_fullres"
NETWORK_CLASS = "iris_nnu.model.network.IrisNetwork"
NUM_STAGES = 5  # 4 down-samplings, as in the paper
MAX_PATCH = 128
MIN_PATCH = 64
BASE_WIDTHS = (32, 24, 16, 8)
MAX_BATCH = 8
MAX_CLASSES_PER_EPISODE = 8
# CPU plan (see "Hardware" above): a CPU has no device memory to fill; these pick a plan that learns at a usable
# speed on few cores.
CPU_MEMORY_GB = 0.5
CPU_PATCH = [32, 32, 32]
CPU_MIN_SPACING = 1.5
HARDWARE = ("auto", "cpu", "gpu")
# Leave room for the CUDA context and allocator fragmentation when the budget is a GPU's whole memory.
GPU_MEMORY_FRACTION = 0.85


@dataclass
class MemberSummary:
    """What the planner needs of one member: its name, dataset.json and nnU-Net fingerprint."""

    name: str
    dataset_json: dict
    fingerprint: dict

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    @property
    def num_foreground_labels(self) -> int:
        return sum(1 for v in self.dataset_json["labels"].values() if v != 0)

    @property
    def median_spacing(self) -> np.ndarray:
        return np.median(np.array(self.fingerprint["spacings"], dtype=float), axis=0)

    @property
    def median_shape(self) -> np.ndarray:
        return np.median(np.array(self.fingerprint["shapes_after_crop"], dtype=float), axis=0)


def resolve_hardware(hardware: str = "auto") -> str:
    """'cpu' or 'gpu': `auto` is 'gpu' when torch sees a CUDA device."""
    if hardware not in HARDWARE:
        raise ValueError(f"hardware must be one of {HARDWARE}, got {hardware!r}")
    if hardware == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return hardware


def default_memory_gb(hardware: str = "auto") -> float:
    """The visible GPU's memory (a fraction of it) for a GPU plan, else the CPU budget."""
    import torch

    if resolve_hardware(hardware) == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("a GPU plan without a visible GPU needs a memory budget (--memory_gb)")
        return GPU_MEMORY_FRACTION * torch.cuda.get_device_properties(0).total_memory / 1024**3
    return CPU_MEMORY_GB


def auto_target_spacing(members: list[MemberSummary]) -> float:
    """Rule 1 of the module docstring, rounded to 0.05 mm."""
    edges = [float(np.prod(m.median_spacing)) ** (1 / 3) for m in members]
    return max(0.05, round(float(np.median(edges)) / 0.05) * 0.05)


def shape_at_spacing(member: MemberSummary, spacing: float) -> np.ndarray:
    return member.median_shape * member.median_spacing / spacing


def widths_for(base: int) -> list[int]:
    return [base * 2**i for i in range(NUM_STAGES)]


def architecture_entry(base_width: int, input_channels: int = 1) -> dict:
    """The plans' `architecture` entry (dotted class path + kwargs, as nnU-Net's)."""
    return {
        "network_class_name": NETWORK_CLASS,
        "arch_kwargs": IrisArchitecture(features_per_stage=widths_for(base_width)).to_kwargs(),
        "_kw_requires_import": [],
    }


def fit_network_and_patch(target_patch: list[int], memory_bytes: float, num_classes: int, input_channels: int,
                          fixed_patch: bool = False) -> tuple[int, list[int], int, int]:
    """Rule 3: (base width, patch, batch, estimated bytes) for the budget; smallest choice if nothing fits.

    With `fixed_patch` only the width and batch adapt to the budget.
    """
    divisor = 2 ** (NUM_STAGES - 1)
    floor = list(target_patch) if fixed_patch else [min(t, MIN_PATCH) for t in target_patch]

    def estimate(base: int, patch: list[int], batch: int) -> int:
        return estimate_memory_bytes(architecture_entry(base)["arch_kwargs"], patch, batch, num_classes,
                                     input_channels=input_channels, training=True)

    for base in BASE_WIDTHS:
        patch = list(target_patch)
        while estimate(base, patch, 2) > memory_bytes and any(p > f for p, f in zip(patch, floor)):
            axis = max((i for i in range(3) if patch[i] > floor[i]), key=lambda i: patch[i] / target_patch[i])
            patch[axis] -= divisor
        if estimate(base, patch, 2) <= memory_bytes or base == BASE_WIDTHS[-1]:
            break
    batch = 2
    while batch < MAX_BATCH and estimate(base, patch, batch + 1) <= memory_bytes:
        batch += 1
    return base, patch, batch, estimate(base, patch, batch)


def normalization_for_member(member: MemberSummary) -> tuple[list[str], list[bool]]:
    """Rule 4: scheme per channel; the non-zero mask is used as nnU-Net does (cropping removed over 1/4)."""
    schemes = [normalization_for_channel(n) for n in member.dataset_json["channel_names"].values()]
    use_mask = member.fingerprint["median_relative_size_after_cropping"] < 0.75
    return ([s.__name__ for s in schemes],
            [bool(use_mask and s.leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true) for s in schemes])


def plan_collection(members: list[MemberSummary], target_spacing: float | None = None,
                    memory_gb: float | None = None, image_reader_writer: str = "SimpleITKIO",
                    patch_size: list[int] | None = None, hardware: str = "auto",
                    plans_name: str = PLANS_IDENTIFIER) -> dict:
    """The joint plan: configuration shared by all members, plus per-member normalisation in `iris.members`.

    `patch_size` (multiples of 16) replaces the automatic patch; `hardware` ('auto', 'cpu', 'gpu') picks the
    defaults of what is not given (module docstring, "Hardware").
    """
    hardware = resolve_hardware(hardware)
    if hardware == "cpu":
        patch_size = CPU_PATCH if patch_size is None else patch_size
        target_spacing = target_spacing or max(CPU_MIN_SPACING, auto_target_spacing(members))
    channels = {m.num_channels for m in members}
    if len(channels) != 1:
        detail = ", ".join(f"{m.name}: {m.num_channels}" for m in members)
        raise ValueError(f"members have different numbers of input channels ({detail}); one network needs one")
    input_channels = channels.pop()
    spacing = float(target_spacing) if target_spacing else auto_target_spacing(members)
    memory_gb = float(memory_gb) if memory_gb else default_memory_gb(hardware)
    divisor = 2 ** (NUM_STAGES - 1)
    largest = np.max([shape_at_spacing(m, spacing) for m in members], axis=0)
    if patch_size is not None:
        if len(patch_size) != 3 or any(p < divisor or p % divisor for p in patch_size):
            raise ValueError(f"patch size {patch_size}: give 3 edge lengths, each a positive multiple of {divisor}")
        target_patch = [int(p) for p in patch_size]
    else:
        target_patch = [int(min(MAX_PATCH, max(divisor, math.ceil(s / divisor) * divisor))) for s in largest]
    num_classes = min(MAX_CLASSES_PER_EPISODE, max(m.num_foreground_labels for m in members))
    base, patch, batch, estimate = fit_network_and_patch(target_patch, memory_gb * 1024**3, num_classes,
                                                         input_channels, fixed_patch=patch_size is not None)
    member_entries = {}
    for m in members:
        schemes, use_mask = normalization_for_member(m)
        member_entries[m.name] = {
            "normalization_schemes": schemes,
            "use_mask_for_norm": use_mask,
            "foreground_intensity_properties_per_channel": m.fingerprint["foreground_intensity_properties_per_channel"],
            "median_shape_at_target_spacing": [round(float(s), 1) for s in shape_at_spacing(m, spacing)],
            "original_median_spacing": [float(s) for s in m.median_spacing],
            "original_median_shape": [float(s) for s in m.median_shape],
        }
    first = member_entries[members[0].name]
    configuration = {
        "data_identifier": f"{plans_name}_{CONFIGURATION}",
        "preprocessor_name": "IrisPreprocessor",
        "batch_size": batch,
        "patch_size": patch,
        "median_image_size_in_voxels": [float(s) for s in np.median(
            [shape_at_spacing(m, spacing) for m in members], axis=0)],
        "spacing": [spacing] * 3,
        "normalization_schemes": first["normalization_schemes"],
        "use_mask_for_norm": first["use_mask_for_norm"],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": architecture_entry(base, input_channels),
        "batch_dice": False,
    }
    return {
        "dataset_name": members[0].name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": first["original_median_spacing"],
        "original_median_shape_after_transp": first["original_median_shape"],
        "image_reader_writer": image_reader_writer,
        # Isotropic target spacing: nnU-Net's transpose (lowest resolution axis first) buys nothing here.
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "iris_nnu.preprocessing.planner.plan_collection",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": first["foreground_intensity_properties_per_channel"],
        "configurations": {CONFIGURATION: configuration},
        "iris": {
            "planned_for": hardware,
            "memory_budget_gb": round(memory_gb, 3),
            "estimated_training_memory_gb": round(estimate / 1024**3, 3),
            "max_classes_per_episode": num_classes,
            "target_patch_size": target_patch,
            "members": member_entries,
        },
    }


def plans_for_member(joint_plans: dict, member_name: str) -> dict:
    """The joint plan specialised to one member: its name, normalisation and intensity statistics."""
    entry = joint_plans["iris"]["members"][member_name]
    plans = {**joint_plans, "dataset_name": member_name,
             "original_median_spacing_after_transp": entry["original_median_spacing"],
             "original_median_shape_after_transp": entry["original_median_shape"],
             "foreground_intensity_properties_per_channel": entry["foreground_intensity_properties_per_channel"]}
    configuration = dict(joint_plans["configurations"][CONFIGURATION])
    configuration["normalization_schemes"] = entry["normalization_schemes"]
    configuration["use_mask_for_norm"] = entry["use_mask_for_norm"]
    plans["configurations"] = {CONFIGURATION: configuration}
    return plans
