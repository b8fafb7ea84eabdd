"""Refresh the demo cases bundled in the package (iris_nnu/demo_data) from a model's held_out.json.

    python scripts/pack_demo_data.py [--data ../shared/data] [-m MODEL_FOLDER] [--queries 3]

Copies, unchanged, from the MSD Hippocampus raw folder (CC-BY-SA 4.0, redistributable with attribution): the
model's first training case (the first case by name that held_out.json does not list) as the reference, and its
first held-out cases as queries, each with its label, plus dataset.json, into iris_nnu/demo_data/Dataset001_Hippocampus
(replacing what was there); and from each dataset of iris_nnu.demo.DEMO_CASES (the CHAOS abdominal MR, CC BY-SA 4.0)
its demo reference and first query. Run it after retraining the default model
on another split, so that the bundled queries stay cases the model never trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from iris_nnu.demo import BUNDLED_DATA, DEMO_CASES, raw_case_files, training_cases  # noqa: E402
from iris_nnu.io.model_folder import read_held_out  # noqa: E402

DATASET = "Dataset001_Hippocampus"
MAX_BYTES = 8 * 1024 * 1024  # all demo data together


def copy_cases(source: str, target: str, reference: str, queries: list[str], note: str) -> None:
    """Copy the cases (image and label) and dataset.json, listing them under iris_demo, into `target` (replaced)."""
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.makedirs(os.path.join(target, "imagesTr"))
    os.makedirs(os.path.join(target, "labelsTr"))
    for case in [reference, *queries]:
        image, label = raw_case_files(source, case)
        shutil.copyfile(image, os.path.join(target, "imagesTr", os.path.basename(image)))
        shutil.copyfile(label, os.path.join(target, "labelsTr", os.path.basename(label)))
    with open(os.path.join(source, "dataset.json")) as f:
        dataset_json = json.load(f)
    dataset_json["numTraining"] = 1 + len(queries)
    dataset_json["iris_demo"] = {"reference": reference, "queries": queries, "note": note}
    with open(os.path.join(target, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)


def pack(data: str, model_folder: str | None, num_queries: int, destination: str = BUNDLED_DATA) -> list[str]:
    """Copy the hippocampus reference and the first `num_queries` held-out cases, and each unseen dataset's
    reference and first query of DEMO_CASES; returns the case names."""
    source = os.path.join(data, DATASET)
    held_out = read_held_out(model_folder)[DATASET]
    reference = training_cases(source, held_out)[0]
    queries = held_out[:num_queries]
    copy_cases(source, os.path.join(destination, DATASET), reference, queries,
               "the reference is a training case of the default model, the queries are held-out cases (its "
               "held_out.json); refresh with scripts/pack_demo_data.py")
    cases = [reference, *queries]
    for name, (demo_reference, demo_queries) in DEMO_CASES.items():
        copy_cases(os.path.join(data, name), os.path.join(destination, name), demo_reference,
                   list(demo_queries[:1]), "the reference and query of benchmarks/accuracy.py; refresh with "
                   "scripts/pack_demo_data.py")
        cases += [demo_reference, demo_queries[0]]
    size = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(destination) for n in names)
    if size > MAX_BYTES:
        raise SystemExit(f"pack_demo_data: {destination} holds {size / 2**20:.1f} MB, over the 8 MB budget")
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("IRIS_DATA") or os.path.join(HERE, "..", "..", "shared", "data"),
                   help=f"folder holding {DATASET} and {', '.join(DEMO_CASES)} in nnU-Net raw format")
    p.add_argument("-m", default=None, help="model folder whose held_out.json decides (default: the bundled model)")
    p.add_argument("--queries", type=int, default=3, help="held-out queries to bundle")
    args = p.parse_args()
    cases = pack(os.path.abspath(args.data), args.m, args.queries)
    print(f"pack_demo_data: {', '.join(cases)} -> {BUNDLED_DATA}")


if __name__ == "__main__":
    main()
