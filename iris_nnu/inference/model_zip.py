"""`iris_export_model` / `iris_install_model`: share a trained model as one zip, as nnU-Net's
nnUNetv2_export_model_to_zip / nnUNetv2_install_pretrained_model_from_zip do.

The zip holds `{collection}/IrisTrainer__{plans}__3d_fullres/` (the path under nnUNet_results) with plans.json,
dataset.json, manifest.json, the model card and held_out.json when there are, and per fold only inference weights
(fp16 unless asked otherwise): no optimiser state, training log or memory bank. Ours rather than nnU-Net's because
theirs copies whole training checkpoints and extracts without checking the paths in the zip.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import zipfile
from pathlib import PurePosixPath

from iris_nnu.cli import HelpFormatter
from iris_nnu.errors import IrisInputError, cli_entry, require_env_folder
from iris_nnu.files import write_atomic
from iris_nnu.inference.model_folder import (
    DEFAULT_CHECKPOINT,
    HELD_OUT_FILE,
    MODEL_CARD_FILE,
    TRAINER_NAME,
    load_model_folder,
    model_folder_folds,
    pack_model_folder,
    read_json_file,
)
from iris_nnu.preprocessing.collection import load_collection
from iris_nnu.preprocessing.planner import CONFIGURATION

EXPORT_PROGRAM = "iris_export_model"
INSTALL_PROGRAM = "iris_install_model"


def _held_out_of_collection(manifest: dict, plans_name: str, fold: str) -> dict[str, list[str]] | None:
    """The fold's validation cases from the collection's splits in nnUNet_preprocessed, when it is there."""
    try:
        return load_collection(manifest["collection"], plans_name).fold_cases(int(fold), "val")
    except (IrisInputError, KeyError, ValueError, TypeError, RuntimeError):
        return None


def export_model(folder: str, zip_path: str, folds: list[str] | None = None,
                 checkpoint_name: str = DEFAULT_CHECKPOINT, half: bool = True) -> list[str]:
    """Write `folder`'s model (the given folds, default all) to `zip_path` atomically; returns the zip's entries."""
    folds = folds or model_folder_folds(folder) or ["0"]  # no fold: pack_model_folder names the missing one
    manifest = read_json_file(os.path.join(folder, "manifest.json"))
    collection = manifest.get("collection") or os.path.basename(os.path.dirname(os.path.abspath(folder)))
    plans_name = read_json_file(os.path.join(folder, "plans.json"))["plans_name"]
    root = f"{collection}/{TRAINER_NAME}__{plans_name}__{CONFIGURATION}"
    with tempfile.TemporaryDirectory(prefix="iris_export_") as tmp:
        packed = os.path.join(tmp, "model")
        for fold in folds:
            held_out = None
            if len(folds) == 1:  # held_out.json describes one fold
                held_out = _read_optional_json(os.path.join(folder, HELD_OUT_FILE)) \
                    or _held_out_of_collection(manifest, plans_name, fold)
            pack_model_folder(folder, packed, fold, checkpoint_name, held_out, half=half)
        card = os.path.join(folder, MODEL_CARD_FILE)
        if os.path.isfile(card):
            shutil.copy(card, os.path.join(packed, MODEL_CARD_FILE))
        entries = sorted(os.path.relpath(os.path.join(d, f), packed).replace(os.sep, "/")
                         for d, _, files in os.walk(packed) for f in files)

        def write(tmp_zip: str) -> None:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as z:
                for entry in entries:
                    z.write(os.path.join(packed, entry), f"{root}/{entry}")

        write_atomic(zip_path, write)
    return [f"{root}/{e}" for e in entries]


def _check_entries(zip_path: str, z: zipfile.ZipFile) -> str:
    """The model folder's path inside the zip; refuses absolute paths, `..`, links and stray files."""
    roots = set()
    for info in z.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
            raise IrisInputError(f"{zip_path}: refused, entry {name!r} would be written outside the install folder")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise IrisInputError(f"{zip_path}: refused, entry {name!r} is a symbolic link")
        if not info.is_dir():
            roots.add("/".join(parts[:2]) if len(parts) > 2 else "")
    if len(roots) != 1 or "" in roots or f"{next(iter(roots))}/plans.json" not in z.namelist():
        raise IrisInputError(f"{zip_path}: not an {EXPORT_PROGRAM} zip (expected one DATASET/"
                             f"{TRAINER_NAME}__PLANS__{CONFIGURATION}/ folder with plans.json)")
    return next(iter(roots))


def install_model(zip_path: str, destination: str | None = None, overwrite: bool = False) -> str:
    """Unpack an exported model into `destination` (default: its path under $nnUNet_results), checked to load
    before it appears there; returns the model folder."""
    if not os.path.isfile(zip_path):
        raise IrisInputError(f"{zip_path}: not found")
    try:
        z = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise IrisInputError(f"{zip_path}: not a zip file") from None
    with z:
        root = _check_entries(zip_path, z)
        target = os.path.abspath(destination or os.path.join(require_env_folder("nnUNet_results"), *root.split("/")))
        if os.path.exists(target) and os.listdir(target) and not overwrite:
            raise IrisInputError(f"{target}: already exists and is not empty (--overwrite replaces it)")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".iris_install_", dir=os.path.dirname(target))
        try:
            for info in z.infolist():
                if not info.is_dir():
                    relative = info.filename[len(root) + 1:]
                    path = os.path.join(staging, *relative.split("/"))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with z.open(info) as src, open(path, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            for fold in model_folder_folds(staging):
                load_model_folder(staging, fold)  # a broken model is refused before it replaces anything
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging)
    return target


def _read_optional_json(path: str) -> dict | None:
    return read_json_file(path) if os.path.isfile(path) else None


# ------------------------------------------------------------------------------------------------ CLIs
def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=EXPORT_PROGRAM, formatter_class=HelpFormatter,
        description="Pack a trained model folder into one zip to share (nnU-Net's nnUNetv2_export_model_to_zip): "
                    "plans, dataset.json, manifest, model card, held_out.json (one fold: the fold's validation "
                    "cases, from the folder or the collection's splits) and inference-only weights; "
                    f"{INSTALL_PROGRAM} unpacks it.")
    p.add_argument("-m", required=True, metavar="MODEL_FOLDER", help="iris_train output folder "
                   "($nnUNet_results/DatasetXXX_Name/IrisTrainer__IrisPlans__3d_fullres)")
    p.add_argument("-o", required=True, metavar="ZIP", help="the zip to write")
    p.add_argument("-f", nargs="+", default=None, metavar="FOLD", help="folds to include (default: all)")
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, help="checkpoint of each fold (stored as checkpoint_final.pth)")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights (default fp16: half the size, "
                                                       "the same segmentations up to rounding)")
    return p


@cli_entry(EXPORT_PROGRAM)
def export_main(argv: list[str] | None = None) -> int:
    args = build_export_parser().parse_args(argv)
    if not os.path.isdir(args.m):
        raise IrisInputError(f"{args.m}: model folder not found")
    folder = os.path.dirname(os.path.abspath(args.o))
    if not os.path.isdir(folder):
        raise IrisInputError(f"-o {args.o}: folder {folder} does not exist")
    entries = export_model(args.m, args.o, args.f, args.chk, half=not args.fp32)
    print(f"{EXPORT_PROGRAM}: wrote {args.o} ({os.path.getsize(args.o) / 1e6:.1f} MB, {len(entries)} files)")
    return 0


def build_install_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=INSTALL_PROGRAM, formatter_class=HelpFormatter,
        description=f"Install a model zip written by {EXPORT_PROGRAM} (nnU-Net's "
                    "nnUNetv2_install_pretrained_model_from_zip). Paths in the zip are checked (no absolute paths, "
                    "no '..', no links) and the model must load before it is put in place.")
    p.add_argument("zip", help="the model zip")
    p.add_argument("-o", default=None, metavar="FOLDER", help="install into this model folder (default: "
                   "$nnUNet_results/DatasetXXX_Name/IrisTrainer__PLANS__3d_fullres as stored in the zip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty model folder")
    return p


@cli_entry(INSTALL_PROGRAM)
def install_main(argv: list[str] | None = None) -> int:
    args = build_install_parser().parse_args(argv)
    target = install_model(args.zip, args.o, args.overwrite)
    print(f"{INSTALL_PROGRAM}: installed {target} (use it with iris_predict -m {target})")
    return 0
