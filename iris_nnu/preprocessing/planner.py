"""ONE joint plan for a collection of datasets (nnU-Net plans schema, configuration `3d_fullres`).

nnU-Net plans each dataset alone; Iris trains one network on all members, so they must share the spacing,
the patch and the network. The rules, in order:

1. Spacing (isotropic). A member's *native edge* is its median voxel size expressed as an isotropic edge,
   (sx*sy*sz)^(1/3): an anisotropic 0.8x0.8x5 mm CT counts as 1.47 mm, a 1 mm MR as 1 mm. Rule `native` (the
   default): each member is preprocessed at max(finest spacing, its native edge), so a coarse member (3.9 x 3.9 x
   2.5 mm CT: 3.35 mm) keeps about its own voxel count instead of being blown up to the MR members' resolution
   (1.5 mm would make that CT 333 x 333 x 213 voxels, 8 minutes per query on a CPU), and a fine member is
   resampled to the finest spacing. `auto` finest spacing: the finest native edge. At inference a run uses the
   same rule on its references (`run_spacing`), so query and reference share one
   spacing that the model saw in training. Rule `fixed`: every member at one spacing, `auto` = the median native
   edge (the Iris paper fixes 1.5 mm for its 12 datasets). Edges are rounded to 0.05 mm.
2. Target patch: per axis, the largest member median shape at its spacing, rounded up to a multiple of the
   network's down-sampling factor and capped at 128 (the paper's patch).
3. Network and patch from the memory budget: for base widths 32, 24, 16, 8 (doubling per stage, 5 stages),
   shrink the patch (largest axis first, down to 64 per axis) until the model's memory estimate for one
   training step fits; the first width that fits wins. Then the batch grows from 2 while it still fits.
4. Normalisation per member by modality (see normalization.py); nnU-Net's rule for the non-zero mask.

Hardware. The rules above make the paper-like plan for a GPU (`hardware="gpu"`, or `auto` with a GPU visible).
For a CPU (`cpu`, or `auto` without a GPU) what is not given is chosen for learning per CPU-hour instead:
finest spacing no finer than 1.5 mm (the paper's), a fixed 32^3 patch and a 0.5 GB budget (widths 8..128). Measured on
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
SPACING_RULES = ("native", "fixed")
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


def round_spacing(mm: float) -> float:
    return max(0.05, round(round(float(mm) / 0.05) * 0.05, 4))


def native_edge(spacing) -> float:
    """An anisotropic voxel size (mm per axis) as the edge of an isotropic voxel of the same volume."""
    return float(np.prod(np.asarray(spacing, dtype=float))) ** (1 / 3)


def auto_target_spacing(members: list[MemberSummary]) -> float:
    """The `fixed` rule's automatic spacing (module docstring, rule 1): the median native edge."""
    return round_spacing(float(np.median([native_edge(m.median_spacing) for m in members])))


def native_spacing(voxel_spacing, finest: float) -> float:
    """The `native` rule (module docstring, rule 1): max(finest, the voxel size's native edge)."""
    return max(float(finest), round_spacing(native_edge(voxel_spacing)))


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
                    plans_name: str = PLANS_IDENTIFIER, spacing_rule: str = "native",
                    orientation: str | None = None) -> dict:
    """The joint plan: configuration shared by all members, plus per-member spacing and normalisation in
    `iris.members`.

    `target_spacing`: the finest spacing (rule `native`) or every member's (`fixed`); `patch_size` (multiples of 16)
    replaces the automatic patch; `hardware` ('auto', 'cpu', 'gpu') picks the defaults of what is not given (module
    docstring, "Hardware"); `orientation`: the voxel order (an orientation code, e.g. 'RAS') every image is
    reoriented to before preprocessing, in training and inference (iris_nnu/orientation.py); None: as stored.
    """
    hardware = resolve_hardware(hardware)
    if spacing_rule not in SPACING_RULES:
        raise ValueError(f"spacing rule must be one of {SPACING_RULES}, got {spacing_rule!r}")
    if not target_spacing:
        target_spacing = (auto_target_spacing(members) if spacing_rule == "fixed" else
                          min(round_spacing(native_edge(m.median_spacing)) for m in members))
        if hardware == "cpu":
            target_spacing = max(CPU_MIN_SPACING, target_spacing)
    if hardware == "cpu":
        patch_size = CPU_PATCH if patch_size is None else patch_size
    channels = {m.num_channels for m in members}
    if len(channels) != 1:
        detail = ", ".join(f"{m.name}: {m.num_channels}" for m in members)
        raise ValueError(f"members have different numbers of input channels ({detail}); one network needs one")
    input_channels = channels.pop()
    spacing = float(target_spacing)
    member_spacing = {m.name: spacing if spacing_rule == "fixed" else native_spacing(m.median_spacing, spacing)
                      for m in members}
    memory_gb = float(memory_gb) if memory_gb else default_memory_gb(hardware)
    divisor = 2 ** (NUM_STAGES - 1)
    largest = np.max([shape_at_spacing(m, member_spacing[m.name]) for m in members], axis=0)
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
            "spacing": [member_spacing[m.name]] * 3,
            "median_shape_at_target_spacing": [round(float(s), 1) for s in
                                               shape_at_spacing(m, member_spacing[m.name])],
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
            [shape_at_spacing(m, member_spacing[m.name]) for m in members], axis=0)],
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
            # configuration spacing = the finest; with `native` a run's spacing follows its references (rule 1)
            "spacing_rule": spacing_rule,
            "orientation": orientation,
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
    configuration["spacing"] = list(entry.get("spacing", configuration["spacing"]))  # plans before the rule: one
    plans["configurations"] = {CONFIGURATION: configuration}
    return plans


def member_spacing(joint_plans: dict, member_name: str) -> float:
    """The isotropic spacing a member was preprocessed at (plans made before per-member spacing: the plan's)."""
    entry = joint_plans.get("iris", {}).get("members", {}).get(member_name, {})
    return float(entry.get("spacing", joint_plans["configurations"][CONFIGURATION]["spacing"])[0])


def run_spacing(plans: dict, voxel_spacings) -> float:
    """The spacing of an inference run whose references have these voxel sizes (mm per axis, one row each): the
    plan's own with rule `fixed` (and in plans made before the rules), else the `native` rule on their median
    native edge, never finer than the plan's finest spacing (rule 1)."""
    finest = float(plans["configurations"][CONFIGURATION]["spacing"][0])
    if plans.get("iris", {}).get("spacing_rule", "fixed") != "native" or not len(voxel_spacings):
        return finest
    return max(finest, round_spacing(float(np.median([native_edge(s) for s in voxel_spacings]))))
