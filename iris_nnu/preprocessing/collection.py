"""A collection: the datasets one Iris model trains on, registered as nnUNet_preprocessed/DatasetXXX_Name/.

The collection folder holds the joint `IrisPlans.json`, a nnU-Net-style `dataset.json`, `manifest.json`
(members, label maps, cases, where their preprocessed data lie) and `splits_final.json`. With several members,
fold k is the union of each member's fold k and split keys read `DatasetXXX_Name/case`; a single dataset is its
own collection and its splits keep nnU-Net's plain case names (so nnU-Net's own file stays valid).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from nnunetv2.utilities.crossval_split import generate_crossval_split

from iris_nnu.errors import IrisInputError, require_env_folder
from iris_nnu.files import write_json_atomic
from iris_nnu.preprocessing.planner import CONFIGURATION, PLANS_IDENTIFIER
from iris_nnu.preprocessing.raw_dataset import foreground_labels

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
NUM_FOLDS = 5


@dataclass
class Member:
    """One member dataset as the manifest records it."""

    name: str
    dataset_id: int
    labels: dict[str, int]
    channel_names: dict[str, str]
    cases: list[str]
    preprocessed_folder: str  # absolute path of the member's {plans}_3d_fullres folder

    @property
    def foreground_labels(self) -> list[int]:
        return foreground_labels(self.labels)


@dataclass
class Collection:
    """A registered collection, loaded from nnUNet_preprocessed."""

    name: str
    folder: str
    plans: dict
    dataset_json: dict
    members: list[Member]
    splits: list[dict[str, list[str]]]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def resolve_key(self, key: str) -> tuple[Member, str]:
        """A split key -> (member, case)."""
        if len(self.members) == 1:
            return self.members[0], key
        name, case = key.split("/", 1)
        return self.member(name), case

    def fold_cases(self, fold: int, subset: str) -> dict[str, list[str]]:
        """Cases of `subset` ('train' or 'val') of a fold, grouped by member name."""
        if not 0 <= fold < len(self.splits):
            raise IrisInputError(f"{self.name}: fold {fold} does not exist, splits_final.json has "
                                 f"{len(self.splits)} folds (0..{len(self.splits) - 1})")
        grouped: dict[str, list[str]] = {m.name: [] for m in self.members}
        for key in self.splits[fold][subset]:
            member, case = self.resolve_key(key)
            grouped[member.name].append(case)
        return grouped


def member_splits(cases: list[str], existing_file: str | None) -> list[dict[str, list[str]]]:
    """A member's 5-fold split: its own splits_final.json if it covers exactly these cases, else nnU-Net's."""
    if existing_file and os.path.isfile(existing_file):
        with open(existing_file) as f:
            splits = json.load(f)
        if (len(splits) == NUM_FOLDS and all(sorted(s["train"] + s["val"]) == sorted(cases) for s in splits)):
            return splits
    return generate_crossval_split(sorted(cases), seed=12345, n_splits=NUM_FOLDS)


def collection_folder_name(collection_id: int, name: str) -> str:
    return f"Dataset{collection_id:03d}_{name}"


def check_collection_id_free(collection_id: int, name: str, member_names: list[str]) -> None:
    """A multi-member collection must not take the id of another dataset, raw or preprocessed."""
    wanted = collection_folder_name(collection_id, name)
    prefix = f"Dataset{collection_id:03d}_"
    for env in ("nnUNet_raw", "nnUNet_preprocessed"):
        root = os.environ.get(env)
        if not root or not os.path.isdir(root):
            continue
        for d in os.listdir(root):
            if d.startswith(prefix) and d != wanted:
                raise IrisInputError(f"collection id {collection_id} is taken by {os.path.join(root, d)}; "
                                     f"choose another with --collection_id")
            if d == wanted and env == "nnUNet_raw" and d not in member_names:
                raise IrisInputError(f"collection {wanted} would shadow the raw dataset {os.path.join(root, d)}; "
                                     f"choose another with --collection_id")


def register_collection(folder: str, plans: dict, members: list[dict]) -> None:
    """Write the collection's plans, dataset.json, splits and (last) manifest into `folder`.

    `members`: dicts with name, dataset_id, labels, channel_names, file_ending, cases, member_folder.
    """
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(folder)
    single = len(members) == 1
    folds: list[dict[str, list[str]]] = [{"train": [], "val": []} for _ in range(NUM_FOLDS)]
    for m in members:
        splits = member_splits(m["cases"], os.path.join(m["member_folder"], "splits_final.json"))
        for k in range(NUM_FOLDS):
            for subset in ("train", "val"):
                folds[k][subset] += [c if single else f"{m['name']}/{c}" for c in splits[k][subset]]
    dataset_json = {
        "name": name,
        "description": "iris-nnu collection of " + ", ".join(m["name"] for m in members),
        "channel_names": members[0]["channel_names"],
        # Iris segments one binary task per class; the members' own label maps are in manifest.json.
        "labels": {"background": 0, "foreground": 1},
        "numTraining": sum(len(m["cases"]) for m in members),
        "file_ending": members[0]["file_ending"],
    }
    plans_name = plans["plans_name"]
    previous = _read_manifest(os.path.join(folder, MANIFEST_FILE))
    manifest = {
        "format": MANIFEST_FORMAT,
        "collection": name,
        "plans_identifier": plans_name,
        # every plans of this collection whose preprocessing finished (-overwrite_plans_name makes more)
        "plans_identifiers": sorted({plans_name, *completed_plans(previous)}),
        "configuration": CONFIGURATION,
        "members": [{
            "name": m["name"], "dataset_id": m["dataset_id"], "labels": m["labels"],
            "channel_names": m["channel_names"], "cases": m["cases"],
        } for m in members],
    }
    if not single:
        write_json_atomic({**plans, "dataset_name": name}, os.path.join(folder, f"{plans_name}.json"))
        write_json_atomic(dataset_json, os.path.join(folder, "dataset.json"))
    write_json_atomic(folds, os.path.join(folder, "splits_final.json"))
    write_json_atomic(manifest, os.path.join(folder, MANIFEST_FILE))


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else {}


def completed_plans(manifest: dict) -> list[str]:
    """Plans identifiers whose preprocessing finished (manifests before -overwrite_plans_name name one)."""
    return list(manifest.get("plans_identifiers", [manifest["plans_identifier"]] if manifest else []))


def find_collection_folder(dataset: str | int) -> str:
    """nnUNet_preprocessed/DatasetXXX_Name for an id ('900', 900) or a full or short name."""
    root = require_env_folder("nnUNet_preprocessed")
    if not os.path.isdir(root):
        raise IrisInputError(f"nnUNet_preprocessed={root} is not a folder")
    text = str(dataset)
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        matches = [d for d in os.listdir(root) if d.startswith(prefix)]
    else:
        matches = [d for d in os.listdir(root) if d == text or (d.startswith("Dataset") and d[11:] == text)]
    matches = [d for d in matches if os.path.isdir(os.path.join(root, d))]
    if not matches:
        raise IrisInputError(f"dataset {text}: not found in nnUNet_preprocessed={root}; "
                             f"run iris_plan_and_preprocess first")
    if len(matches) > 1:
        raise IrisInputError(f"dataset {text}: several folders match in nnUNet_preprocessed: {', '.join(matches)}")
    return os.path.join(root, matches[0])


def load_collection(dataset: str | int, plans_identifier: str = PLANS_IDENTIFIER) -> Collection:
    """Load a registered collection; a clear error if it was never planned or its planning did not finish."""
    folder = find_collection_folder(dataset)
    name = os.path.basename(folder)
    root = os.path.dirname(folder)
    manifest_file = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(manifest_file):
        raise IrisInputError(f"{name}: {manifest_file} not found: the dataset was not planned with "
                             f"iris_plan_and_preprocess (or planning did not finish)")

    def read(path: str) -> dict | list:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise IrisInputError(f"{name}: cannot read {path} ({e})") from None

    manifest = read(manifest_file)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise IrisInputError(f"{name}: {manifest_file} has format {found}, this iris-nnu reads format "
                             f"{MANIFEST_FORMAT}: re-run iris_plan_and_preprocess")
    plans_file = os.path.join(folder, f"{plans_identifier}.json")
    if plans_identifier not in completed_plans(manifest) or not os.path.isfile(plans_file):
        raise IrisInputError(f"{name}: no finished plans {plans_identifier!r} (-p); it has "
                             f"{', '.join(completed_plans(manifest))} (iris_plan_and_preprocess "
                             f"-overwrite_plans_name makes more)")
    plans = read(plans_file)
    data_identifier = plans["configurations"][CONFIGURATION]["data_identifier"]
    members = [Member(m["name"], m["dataset_id"], m["labels"], m["channel_names"], m["cases"],
                      os.path.join(root, m["name"], data_identifier))
               for m in manifest["members"]]
    splits_file = os.path.join(folder, "splits_final.json")
    return Collection(name, folder, plans, read(os.path.join(folder, "dataset.json")), members,
                      read(splits_file) if os.path.isfile(splits_file) else [])
