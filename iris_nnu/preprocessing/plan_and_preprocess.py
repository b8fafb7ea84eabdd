"""`iris_plan_and_preprocess`: fingerprint member datasets, make ONE joint plan, preprocess, register a collection."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
    DatasetFingerprintExtractor,
)
from nnunetv2.imageio.reader_writer_registry import (
    determine_reader_writer_from_dataset_json,
)
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from tqdm import tqdm

from iris_nnu.cli import HelpFormatter
from iris_nnu.errors import IrisInputError, cli_entry, require_env_folder
from iris_nnu.files import write_atomic, write_json_atomic
from iris_nnu.orientation import orientation_code, valid_orientation
from iris_nnu.preprocessing.collection import (
    MANIFEST_FILE,
    check_collection_id_free,
    collection_folder_name,
    register_collection,
)
from iris_nnu.preprocessing.planner import (
    CONFIGURATION,
    HARDWARE,
    PLANS_IDENTIFIER,
    SPACING_RULES,
    MemberSummary,
    plan_collection,
    plans_for_member,
)
from iris_nnu.preprocessing.preprocessor import SIGNATURE_SUFFIX, preprocess_member
from iris_nnu.preprocessing.raw_dataset import (
    RawDataset,
    check_raw_dataset,
    find_unreadable_file,
    load_raw_dataset,
)

DEFAULT_COLLECTION_ID = 900
STORED_ORIENTATION = "STORED"  # --orientation stored: the plans' iris.orientation null


def fingerprint(dataset: RawDataset, num_processes: int, overwrite: bool) -> dict:
    """nnU-Net's dataset fingerprint (cached in nnUNet_preprocessed/DatasetXXX/dataset_fingerprint.json)."""
    path = os.path.join(require_env_folder("nnUNet_preprocessed"), dataset.name, "dataset_fingerprint.json")
    if not overwrite and os.path.isfile(path):
        try:
            return load_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            overwrite = True  # a fingerprint cut short by an interruption: make it again
    if not dataset.has_labels:
        return images_only_fingerprint(dataset, path)
    print(f"{dataset.name}: extracting nnU-Net fingerprint of {len(dataset.cases)} cases")
    try:
        result = DatasetFingerprintExtractor(dataset.dataset_id, num_processes, verbose=False).run(overwrite)
    except Exception as e:  # noqa: BLE001 - nnU-Net's workers do not say which file failed; find it
        bad = find_unreadable_file(dataset)
        where = f"{bad}: unreadable image" if bad else f"fingerprint extraction failed ({type(e).__name__}: {e})"
        raise IrisInputError(f"{dataset.name}: {where}") from None
    return json.loads(json.dumps(result))  # as read back from the file: string keys, lists not arrays


def images_only_fingerprint(dataset: RawDataset, path: str, num_samples: int = 10000) -> dict:
    """nnU-Net's fingerprint of a member without labels: nnU-Net's extractor samples intensities inside the labelled
    foreground, which such a member lacks, so here they are sampled inside the body (nnU-Net's non-zero crop)."""
    reader_writer = determine_reader_writer_from_dataset_json(dataset.dataset_json,
                                                              next(iter(dataset.cases.values()))["images"][0])()
    spacings, shapes, relative, samples = [], [], [], []
    for files in tqdm(dataset.cases.values(), desc=f"{dataset.name}: fingerprint (images only)", unit="case"):
        try:
            images, properties = reader_writer.read_images(files["images"])
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise IrisInputError(f"{dataset.name}: {files['images'][0]}: unreadable image ({e})") from None
        cropped, seg, _ = crop_to_nonzero(images)
        samples.append(DatasetFingerprintExtractor.collect_foreground_intensities(
            (seg == 0).astype(np.int8), cropped, num_samples=num_samples)[0])
        spacings.append([float(s) for s in properties["spacing"]])
        shapes.append([int(s) for s in cropped.shape[1:]])
        relative.append(float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:])))
    statistics = {}
    for c in range(len(dataset.channel_names)):  # as nnU-Net's extractor summarises its samples
        values = np.concatenate([np.asarray(s[c], dtype=np.float64) for s in samples])
        low, median, high = np.percentile(values, (0.5, 50.0, 99.5))
        statistics[str(c)] = {"mean": float(values.mean()), "median": float(median), "std": float(values.std()),
                              "min": float(values.min()), "max": float(values.max()),
                              "percentile_99_5": float(high), "percentile_00_5": float(low)}
    result = {"spacings": spacings, "shapes_after_crop": shapes,
              "foreground_intensity_properties_per_channel": statistics,
              "median_relative_size_after_cropping": float(np.median(relative))}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(result, path)
    return result


def majority_orientation(datasets: list[RawDataset]) -> str:
    """The orientation code most cases of the members are stored in (ties: the first member's first case's)."""
    codes = []
    for d in datasets:
        for files in d.cases.values():
            reader = sitk.ImageFileReader()
            reader.SetFileName(files["images"][0])
            reader.ReadImageInformation()
            codes.append(orientation_code(reader.GetDirection()))
    return max(dict.fromkeys(codes), key=codes.count)


def copy_ground_truth(dataset: RawDataset, member_folder: str) -> None:
    """Copy labels to gt_segmentations/ as nnU-Net does, so validation needs no nnUNet_raw."""
    if not dataset.has_labels:
        return
    gt = os.path.join(member_folder, "gt_segmentations")
    os.makedirs(gt, exist_ok=True)
    for case, files in dataset.cases.items():
        dst = os.path.join(gt, case + dataset.dataset_json["file_ending"])
        if not os.path.isfile(dst) or os.path.getsize(dst) != os.path.getsize(files["label"]):
            write_atomic(dst, lambda tmp: shutil.copyfile(files["label"], tmp))


def clean_previous(datasets: list[RawDataset], collection_folder: str, plans_name: str) -> None:
    """--clean: remove what earlier Iris runs wrote (never nnU-Net's own plans or data)."""
    root = require_env_folder("nnUNet_preprocessed")
    for d in datasets:
        folder = os.path.join(root, d.name)
        shutil.rmtree(os.path.join(folder, f"{plans_name}_{CONFIGURATION}"), ignore_errors=True)
        for f in (f"{plans_name}.json", MANIFEST_FILE, f"{plans_name}_{CONFIGURATION}{SIGNATURE_SUFFIX}"):
            if os.path.isfile(os.path.join(folder, f)):
                os.remove(os.path.join(folder, f))
    if len(datasets) > 1:
        shutil.rmtree(collection_folder, ignore_errors=True)


def parse_spacing(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a spacing in mm, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"spacing must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iris_plan_and_preprocess",
        description="Fingerprint one or more nnU-Net raw datasets, make ONE joint Iris plan for all of them "
                    "(common isotropic spacing, patch and network sized to a memory budget, normalisation per "
                    "modality), preprocess every dataset with it and register them as one collection in "
                    "nnUNet_preprocessed, ready for `iris_train COLLECTION FOLD`. Re-running skips finished work. "
                    "A dataset without labelsTr/ is a member of images only (imagesTr/, or imagesTs/): it is "
                    "planned and preprocessed without label statistics and trains self-supervised episodes only, "
                    "so unlabelled scans of your scanner and anatomy shape the model.",
        formatter_class=HelpFormatter)
    p.add_argument("-d", nargs="+", type=int, required=True, metavar="ID",
                   help="dataset ids in nnUNet_raw (DatasetXXX_Name folders)")
    p.add_argument("--collection_id", type=int, default=None,
                   help=f"id of the collection folder; default: the dataset's own id with one -d, "
                        f"else {DEFAULT_COLLECTION_ID}")
    p.add_argument("--collection_name", default=None,
                   help="name of the collection folder (DatasetXXX_NAME); default: the dataset's own name with "
                        "one -d, else the member names joined by '_'")
    p.add_argument("--plan_for", choices=HARDWARE, default="auto",
                   help="hardware the plan is for, which sets the defaults below: gpu = the paper-like plan (auto "
                        "spacing, patch up to 128, sized to the GPU's memory); cpu = a plan that learns per "
                        "CPU-hour (spacing >= 1.5 mm, 32^3 patch, 0.5 GB); auto: gpu if torch sees one, else cpu")
    p.add_argument("--target_spacing", type=parse_spacing, default=None, metavar="auto|MM",
                   help="isotropic spacing in mm: the finest (rule native) or every member's (rule fixed); auto: "
                        "the finest member's native edge (cube root of its median voxel volume) with rule native, "
                        "the median of the members' with rule fixed (default: auto; for a CPU plan at least 1.5)")
    p.add_argument("--spacing_rule", choices=SPACING_RULES, default="native",
                   help="native: each member at max(target spacing, its own native edge), so coarse members (3.9 mm "
                        "CT, 7.7 mm slices) are not blown up to the finest member's resolution, and inference runs "
                        "at the spacing the same rule gives its references; fixed: every member and run at the "
                        "target spacing")
    p.add_argument("--orientation", default=None, metavar="CODE",
                   help="voxel order every image is reoriented to before preprocessing, in training and at inference "
                        "(an orientation code of SimpleITK's DICOMOrient, e.g. RAS, LPS), so that a result does not "
                        "depend on how a scan is stored; 'stored': no common order, each member as its cases are "
                        "stored (its first case's order) and a run in its first reference's order, as models planned "
                        "before this rule (the bundled one) learnt their members; default: the code most of the "
                        "members' cases are stored in")
    p.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="training patch in voxels at the target spacing, multiples of 16; the memory budget then "
                        "sets only width and batch (default for a GPU plan: the largest member's median shape, "
                        "capped at 128 and shrunk to fit the budget; for a CPU plan: 32 32 32)")
    p.add_argument("--memory_gb", type=float, default=None,
                   help="memory budget for one training step; default: 85%% of the visible GPU's memory for a GPU "
                        "plan, 0.5 GB for a CPU plan")
    p.add_argument("-overwrite_plans_name", "--overwrite_plans_name", default=PLANS_IDENTIFIER, metavar="NAME",
                   help="name of the plans (nnU-Net's flag): plans with another name live beside the default ones, "
                        "with their own preprocessed data and model folders; train them with iris_train -p NAME")
    p.add_argument("-np", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="processes for fingerprinting, checking and preprocessing")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="also read every label and image in full: label values within dataset.json's labels, "
                        "no NaN/inf (headers and geometry are always checked)")
    p.add_argument("--clean", action="store_true",
                   help="redo everything: fingerprints, plans and preprocessed data")
    return p


@cli_entry("iris_plan_and_preprocess")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.np < 1:
        raise IrisInputError(f"-np must be at least 1, got {args.np}")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise IrisInputError(f"--memory_gb must be positive, got {args.memory_gb}")
    plans_name = args.overwrite_plans_name
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9\-]*", plans_name):
        raise IrisInputError(f"-overwrite_plans_name {plans_name!r}: use letters, digits and '-' ('_' separates "
                             f"the plans name from the configuration in nnU-Net's folder names)")
    ids = list(dict.fromkeys(args.d))
    root = require_env_folder("nnUNet_preprocessed")
    datasets = [load_raw_dataset(i) for i in ids]
    for d in datasets:
        if len(d.cases) < 5:
            raise IrisInputError(f"{d.name}: {len(d.cases)} cases; Iris needs at least 5 for nnU-Net's 5-fold split")

    if len(datasets) == 1:
        collection_id = args.collection_id if args.collection_id is not None else datasets[0].dataset_id
        name = args.collection_name or datasets[0].name.split("_", 1)[1]
    else:
        collection_id = args.collection_id if args.collection_id is not None else DEFAULT_COLLECTION_ID
        name = args.collection_name or "_".join(d.name.split("_", 1)[1] for d in datasets)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise IrisInputError(f"--collection_name {name!r}: use letters, digits, '_' and '-'")
    collection_folder = os.path.join(root, collection_folder_name(collection_id, name))
    is_member_folder = len(datasets) == 1 and collection_folder == os.path.join(root, datasets[0].name)
    if len(datasets) == 1 and not is_member_folder:
        raise IrisInputError("with a single -d the dataset is its own collection; leave out --collection_id and "
                             "--collection_name (or give the dataset's own)")
    if not is_member_folder:
        check_collection_id_free(collection_id, name, [d.name for d in datasets])
    if args.clean:
        clean_previous(datasets, collection_folder, plans_name)

    for d in datasets:
        check_raw_dataset(d, full=args.verify_dataset_integrity, num_processes=args.np)
    summaries = [MemberSummary(d.name, d.dataset_json, fingerprint(d, args.np, args.clean)) for d in datasets]
    reader = determine_reader_writer_from_dataset_json(datasets[0].dataset_json,
                                                      next(iter(datasets[0].cases.values()))["images"][0])
    orientation = args.orientation.upper() if args.orientation else majority_orientation(datasets)
    if orientation == STORED_ORIENTATION:
        orientation = None  # the plans' null: preprocessor and predictor fall back to the stored order
    elif not valid_orientation(orientation):
        raise IrisInputError(f"--orientation {args.orientation}: not an orientation code (three letters, one of R/L, "
                             f"A/P, S/I each, e.g. RAS or LPS) nor 'stored'")
    try:
        plans = plan_collection(summaries, args.target_spacing, args.memory_gb, reader.__name__, args.patch_size,
                                args.plan_for, plans_name, args.spacing_rule, orientation)
    except ValueError as e:
        raise IrisInputError(str(e)) from None
    configuration = plans["configurations"][CONFIGURATION]
    arch = configuration["architecture"]["arch_kwargs"]
    print(f"joint plan: voxel order {orientation or 'as stored'}, spacing {configuration['spacing'][0]:g} mm "
          f"({args.spacing_rule}), patch {configuration['patch_size']}, batch {configuration['batch_size']}, "
          f"widths {arch['features_per_stage']}, estimated {plans['iris']['estimated_training_memory_gb']:.2f} of "
          f"{plans['iris']['memory_budget_gb']:.2f} GB")
    for name, entry in plans["iris"]["members"].items():
        print(f"  {name}: {entry['spacing'][0]:g} mm, median shape {entry['median_shape_at_target_spacing']}")

    for d in datasets:
        member_folder = os.path.join(root, d.name)
        os.makedirs(member_folder, exist_ok=True)
        member_plans = plans_for_member(plans, d.name)
        write_json_atomic(d.dataset_json, os.path.join(member_folder, "dataset.json"))
        write_json_atomic(member_plans, os.path.join(member_folder, f"{plans_name}.json"))
        copy_ground_truth(d, member_folder)
        errors = preprocess_member(d.name, d.cases, member_plans, d.dataset_json,
                                   os.path.join(member_folder, configuration["data_identifier"]), args.np)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise IrisInputError(f"{d.name}: {errors[0]}{more}")

    register_collection(collection_folder, plans, [{
        "name": d.name, "dataset_id": d.dataset_id, "labels": d.labels, "channel_names": d.channel_names,
        "file_ending": d.dataset_json["file_ending"], "cases": list(d.cases),
        "member_folder": os.path.join(root, d.name)} for d in datasets])
    plans_flag = "" if plans_name == PLANS_IDENTIFIER else f" -p {plans_name}"
    print(f"collection {os.path.basename(collection_folder)} ready: "
          f"iris_train {collection_id} FOLD{plans_flag}  (folder {collection_folder})")
    return 0


if __name__ == "__main__":
    main()
