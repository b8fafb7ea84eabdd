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
import zlib

from iris_nnu.cli import HelpFormatter
from iris_nnu.errors import IrisInputError, brief, cli_entry, require_env_folder
from iris_nnu.files import write_atomic
from iris_nnu.io.model_folder import (
    DEFAULT_CHECKPOINT,
    HELD_OUT_FILE,
    MODEL_CARD_FILE,
    TRAINER_NAME,
    fold_folder_name,
    model_folder_folds,
    pack_model_folder,
    read_json_file,
)
from iris_nnu.preprocessing.collection import load_collection
from iris_nnu.preprocessing.planner import CONFIGURATION

EXPORT_PROGRAM = "iris_export_model"
INSTALL_PROGRAM = "iris_install_model"
# Limits on what a zip may unpack to, checked from the zip's directory before anything is written and again while
# bytes are written (a zip can lie about sizes): a fold's inference weights are ~9 MB (the bundled model, fp16) to a
# few hundred MB (large GPU plans, fp32), so 1 GiB per file and 8 GiB in all (5 folds of the largest, with room)
# refuse only zip bombs. An entry over 1 MiB may also expand at most 100-fold: weights hardly compress (the bundled
# model's 1.1x); a bomb expands ~1000-fold.
MAX_FILE_BYTES = 1 << 30
MAX_TOTAL_BYTES = 8 << 30
MAX_RATIO = 100
RATIO_FROM_BYTES = 1 << 20


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
    _refuse_links(folder, folds, checkpoint_name)
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


def _refuse_links(folder: str, folds: list[str], checkpoint_name: str) -> None:
    """Export packs only the model folder's own regular files: a link (to a key, another patient's data, ...) would
    put whatever it points at into a zip meant to be shared."""
    names = ["plans.json", "dataset.json", "manifest.json", MODEL_CARD_FILE, HELD_OUT_FILE]
    for fold in folds:
        names += [fold_folder_name(fold), os.path.join(fold_folder_name(fold), checkpoint_name)]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            raise IrisInputError(f"{path}: a symbolic link; {EXPORT_PROGRAM} packs only the model folder's own "
                                 f"files (copy it in place of the link)")


def _entry_parts(zip_path: str, info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The path parts of an entry, refused unless its name is a plain relative path in normal form (no absolute
    path, drive, '..', '.', empty part, backslash or link): what is written is exactly what was checked."""
    name = info.filename
    parts = tuple(name.rstrip("/").split("/")) if info.is_dir() else tuple(name.split("/"))
    if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\\" in name:
        raise IrisInputError(f"{zip_path}: refused, entry {name!r} would be written outside the install folder")
    if any(p in ("", ".") for p in parts):
        raise IrisInputError(f"{zip_path}: refused, entry {name!r} is not a plain relative path (empty or '.' "
                             f"parts); {EXPORT_PROGRAM} never writes such names")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise IrisInputError(f"{zip_path}: refused, entry {name!r} is a symbolic link")
    return parts


def _check_entries(zip_path: str, z: zipfile.ZipFile) -> tuple[str, dict[tuple[str, ...], zipfile.ZipInfo]]:
    """The model folder's path inside the zip and its files {path parts inside it: entry}; refuses absolute paths,
    `..`, links, names not in normal form, duplicates, stray files, sizes over the caps and a zip without a fold."""
    roots, entries, total = set(), {}, 0
    for info in z.infolist():
        parts = _entry_parts(zip_path, info)
        if info.is_dir():
            continue
        roots.add("/".join(parts[:2]) if len(parts) > 2 else "")
        if parts in entries:
            raise IrisInputError(f"{zip_path}: refused, entry {info.filename!r} is in the zip twice")
        entries[parts] = info
        total += info.file_size
        _check_size(zip_path, info, info.file_size, total)
    files = {parts[2:]: info for parts, info in entries.items()}
    if len(roots) != 1 or "" in roots or ("plans.json",) not in files:
        raise IrisInputError(f"{zip_path}: not an {EXPORT_PROGRAM} zip (expected one DATASET/"
                             f"{TRAINER_NAME}__PLANS__{CONFIGURATION}/ folder with plans.json)")
    if not any(len(p) == 2 and p[0].startswith("fold_") and p[1] == DEFAULT_CHECKPOINT for p in files):
        raise IrisInputError(f"{zip_path}: refused, the zip holds no fold (fold_F/{DEFAULT_CHECKPOINT}): "
                             f"not a model")
    return next(iter(roots)), files


def _check_size(zip_path: str, info: zipfile.ZipInfo, size: int, total: int) -> None:
    """Refuse an entry whose (declared or written) size passes the caps: a zip bomb."""
    ratio = size / max(info.compress_size, 1)
    if size > MAX_FILE_BYTES or total > MAX_TOTAL_BYTES or (size > RATIO_FROM_BYTES and ratio > MAX_RATIO):
        raise IrisInputError(f"{zip_path}: refused, entry {info.filename!r} unpacks to {size / 2**20:.0f} MiB "
                             f"({ratio:.0f}x its {info.compress_size / 2**20:.1f} MiB in the zip; the zip "
                             f"{total / 2**20:.0f} MiB so far); the limits are {MAX_FILE_BYTES >> 20} MiB per file, "
                             f"{MAX_TOTAL_BYTES >> 20} MiB in all and {MAX_RATIO}x for files over "
                             f"{RATIO_FROM_BYTES >> 20} MiB")


def _extract(zip_path: str, z: zipfile.ZipFile, files: dict[tuple[str, ...], zipfile.ZipInfo], staging: str) -> None:
    """Write each checked entry under `staging` by its checked path parts, counting the bytes as they come."""
    total = 0
    for parts, info in files.items():
        path = os.path.join(staging, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        written = 0
        try:
            with z.open(info) as src, open(path, "xb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    total += len(chunk)
                    _check_size(zip_path, info, written, total)
                    dst.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise IrisInputError(f"{zip_path}: entry {info.filename!r} is corrupt ({e})") from None


def _test_load(folder: str) -> None:
    """Load the plans as iris_predict does and every fold's network: a broken model never replaces anything."""
    from iris_nnu.inference.predictor import IrisPredictor  # heavy; only needed here

    folds = model_folder_folds(folder)
    for name in ("dataset.json", "manifest.json", HELD_OUT_FILE):
        if os.path.isfile(os.path.join(folder, name)):
            read_json_file(os.path.join(folder, name))
    try:
        IrisPredictor(device="cpu").initialize_from_model_folder(folder, folds)
    except IrisInputError:
        raise
    except Exception as e:  # noqa: BLE001 - plans that nnU-Net cannot use: one line
        raise IrisInputError(f"plans.json: not usable by iris_predict ({type(e).__name__}: "
                             f"{brief(e) if str(e) else ''})") from None


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
        root, files = _check_entries(zip_path, z)
        target = os.path.abspath(destination or os.path.join(require_env_folder("nnUNet_results"), *root.split("/")))
        if os.path.islink(target) or (os.path.exists(target) and not os.path.isdir(target)):
            raise IrisInputError(f"{target}: exists and is not a folder")
        if os.path.exists(target) and os.listdir(target) and not overwrite:
            raise IrisInputError(f"{target}: already exists and is not empty (--overwrite replaces it)")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".iris_install_", dir=os.path.dirname(target))
        aside, installed = None, False
        try:
            _extract(zip_path, z, files, staging)
            try:
                _test_load(staging)
            except IrisInputError as e:
                raise IrisInputError(f"{zip_path}: refused, the model does not load: "
                                     f"{str(e).replace(staging, '<zip>')}") from None
            if os.path.exists(target):  # swap: the old model aside, the new one in, then the old one deleted
                aside = tempfile.mkdtemp(prefix=".iris_replaced_", dir=os.path.dirname(target))
                os.replace(target, os.path.join(aside, "model"))
            try:
                os.replace(staging, target)
                installed = True
            except OSError:
                if aside is not None:
                    os.replace(os.path.join(aside, "model"), target)
                    os.rmdir(aside)
                    aside = None
                raise
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging)
            if aside is not None and installed:
                shutil.rmtree(aside, ignore_errors=True)
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
                    "no '..', no odd names, no links), sizes are capped (1 GiB per file, 8 GiB in all, 100x "
                    "compression above 1 MiB), a zip with no fold is refused, and the plans and every fold must load "
                    "before the model is swapped in: a failed install leaves the old folder as it was.")
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
