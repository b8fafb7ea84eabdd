"""An `iris_train` model folder: plans.json, dataset.json, manifest.json and fold_F/checkpoint_*.pth.

Loaded without nnU-Net's trainer lookups (they import torchvision, which fails with the CPU build of torch):
the network is built from the plans' architecture entry by `iris_nnu.model.build_network`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from iris_nnu.errors import IrisInputError, brief
from iris_nnu.files import write_atomic, write_json_atomic
from iris_nnu.model import IrisNetwork, build_network
from iris_nnu.preprocessing.planner import CONFIGURATION

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
TRAINER_NAME = "IrisTrainer"
# The model shipped inside the package (see its MODEL_CARD.md); used when no model folder is given.
DEFAULT_MODEL_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")
HELD_OUT_FILE = "held_out.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
# nnU-Net's training log in a checkpoint holds numpy scalars; these rebuild them and nothing else, so checkpoints
# load with weights_only=True (no code from the file runs)
_NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in np.typecodes["All"]}]


@dataclass
class IrisModel:
    """A loaded model: the network (eval mode, CPU) and what inference needs from its folder."""

    folder: str
    fold: str
    checkpoint_name: str
    plans: dict
    dataset_json: dict
    network: IrisNetwork
    inference_allowed_mirroring_axes: tuple[int, ...] | None

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])


def fold_folder_name(fold: int | str) -> str:
    return f"fold_{fold}"


def model_folder_folds(folder: str) -> list[str]:
    """The folds of a model folder (names after `fold_`)."""
    return sorted(d[len("fold_"):] for d in os.listdir(folder)
                  if d.startswith("fold_") and os.path.isdir(os.path.join(folder, d)))


def read_json_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise IrisInputError(f"{path}: not found; is {os.path.dirname(path)} an iris_train model folder?")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IrisInputError(f"{path}: not valid JSON ({e})") from None


def strip_prefixes(state: dict) -> dict:
    """Weights saved from a compiled (`_orig_mod.`) or DDP (`module.`) network load into the plain one."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents, loaded with weights_only=True: tensors, plain Python values, numpy scalars."""
    with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict, got {type(checkpoint).__name__}")
    return checkpoint


def load_network_weights(path: str) -> dict:
    """The network weights of a checkpoint (loaded as load_checkpoint does), keys as the plain network's."""
    return strip_prefixes(load_checkpoint(path)["network_weights"])


def load_model_folder(folder: str | None, fold: int | str = 0, checkpoint_name: str = DEFAULT_CHECKPOINT,
                      ) -> IrisModel:
    """Load plans, dataset.json and the fold's checkpoint; every problem is one line naming the file."""
    if folder is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL_FOLDER, fold_folder_name(fold), checkpoint_name)):
            raise IrisInputError(f"{DEFAULT_MODEL_FOLDER}: the bundled default model has no "
                                 f"{fold_folder_name(fold)}/{checkpoint_name}; pass -m MODEL_FOLDER (an iris_train "
                                 f"output folder, e.g. $nnUNet_results/DatasetXXX_Name/IrisTrainer__IrisPlans__3d_fullres)")
        folder = DEFAULT_MODEL_FOLDER
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise IrisInputError(f"{folder}: model folder not found")
    plans = read_json_file(os.path.join(folder, "plans.json"))
    dataset_json = read_json_file(os.path.join(folder, "dataset.json"))
    try:
        architecture = plans["configurations"][CONFIGURATION]["architecture"]
        num_channels = len(dataset_json["channel_names"])
    except (KeyError, TypeError):
        raise IrisInputError(f"{folder}: plans.json has no '{CONFIGURATION}' architecture entry or dataset.json no "
                             f"'channel_names'") from None
    fold_dir = os.path.join(folder, fold_folder_name(fold))
    if not os.path.isdir(fold_dir):
        folds = [fold_folder_name(f) for f in model_folder_folds(folder)]
        raise IrisInputError(f"{fold_dir}: not found; this model folder has {', '.join(folds) or 'no folds'} (-f)")
    checkpoint_file = os.path.join(fold_dir, checkpoint_name)
    if not os.path.isfile(checkpoint_file):
        found = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth"))
        raise IrisInputError(f"{checkpoint_file}: not found; {fold_dir} has {', '.join(found) or 'no checkpoints'} "
                             f"(-chk)")
    try:
        checkpoint = load_checkpoint(checkpoint_file)
        weights = strip_prefixes(checkpoint["network_weights"])
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file: one line naming it
        raise IrisInputError(f"{checkpoint_file}: not a readable iris_train checkpoint ({type(e).__name__}: "
                             f"{brief(e) if str(e) else ''})") from None
    try:
        network = build_network(architecture, input_channels=num_channels, deep_supervision=False)
        network.load_state_dict(weights)
    except (ImportError, RuntimeError, TypeError, ValueError) as e:
        raise IrisInputError(f"{checkpoint_file}: does not fit the architecture in {folder}/plans.json "
                             f"({brief(e)})") from None
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return IrisModel(folder, str(fold), checkpoint_name, plans, dataset_json, network.eval(),
                     tuple(int(a) for a in axes) if axes is not None else None)


def read_held_out(folder: str | None, file: str | None = None) -> dict[str, list[str]]:
    """Cases per dataset that the model never trained on (its fold's validation cases): `file`, else the model
    folder's held_out.json (the bundled model's for None)."""
    path = file or os.path.join(folder or DEFAULT_MODEL_FOLDER, HELD_OUT_FILE)
    if not os.path.isfile(path):
        raise IrisInputError(f"{path}: not found; it lists the cases the model never trained on, "
                             f"{{dataset name: [case, ...]}}")
    held_out = read_json_file(path)
    if not isinstance(held_out, dict) or not all(isinstance(v, list) for v in held_out.values()):
        raise IrisInputError(f"{path}: expected {{dataset name: [case, ...]}}")
    return held_out


def pack_model_folder(source: str, destination: str, fold: int | str = 0, checkpoint_name: str = DEFAULT_CHECKPOINT,
                      held_out: dict[str, list[str]] | None = None, half: bool = True) -> str:
    """Copy a model folder for shipping: JSON files and inference-only weights (fp16 with `half`) as
    fold_F/checkpoint_final.pth, nothing else; returns that path.

    The optimiser state, memory bank and logs (most of a training checkpoint's size) are dropped; the network
    loads fp16 weights back into float32 parameters.
    """
    model = load_model_folder(source, fold, checkpoint_name)
    manifest = read_json_file(os.path.join(source, "manifest.json"))
    write_model_folder(destination, model.plans, model.dataset_json, model.network, fold, manifest,
                       model.inference_allowed_mirroring_axes, half=half, held_out=held_out)
    return os.path.join(destination, fold_folder_name(fold), DEFAULT_CHECKPOINT)


def write_model_folder(folder: str, plans: dict, dataset_json: dict, network: IrisNetwork, fold: int | str = 0,
                       manifest: dict | None = None, mirror_axes: tuple[int, ...] | None = (0, 1, 2),
                       checkpoint_names: tuple[str, ...] = (DEFAULT_CHECKPOINT,), half: bool = False,
                       held_out: dict[str, list[str]] | None = None) -> str:
    """Write a model folder as iris_train lays it out (for tests, benchmarks, packed or imported weights).

    `half` stores floating-point weights as fp16; `held_out` is written as held_out.json. Returns the folder."""
    fold_dir = os.path.join(folder, fold_folder_name(fold))
    os.makedirs(fold_dir, exist_ok=True)
    files = [("plans.json", plans), ("dataset.json", dataset_json),
             ("manifest.json", manifest or {"format": 1, "members": []})]
    for name, obj in files + ([(HELD_OUT_FILE, held_out)] if held_out is not None else []):
        write_json_atomic(obj, os.path.join(folder, name))
    weights = {k: (v.half() if half and v.is_floating_point() else v) for k, v in network.state_dict().items()}
    checkpoint = {"network_weights": weights, "trainer_name": TRAINER_NAME, "current_epoch": 0,
                  "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold,
                                "dataset_json": dataset_json},
                  "inference_allowed_mirroring_axes": mirror_axes}
    for name in checkpoint_names:
        write_atomic(os.path.join(fold_dir, name), lambda tmp: torch.save(checkpoint, tmp))
    return folder
