"""Feasibility of fusing Iris with registration (issue 21, item 4), before it is built into iris_predict.

Per query: Iris one-shot from reference #1 (the decision threshold calibrated on it, as iris_predict's default) with
its per-class probabilities, and the reference's label carried onto the query by accuracy.py's registration baseline
(inference/registration.py: SimpleITK affine then B-spline, Mattes MI, 2 mm grid), each class's mask warped with linear interpolation (a soft
map). Dice of Iris, of the registration (its soft map > 0.5), and of their weighted mean w * Iris + (1 - w) *
registration at 0.5 and at the calibrated threshold, for w in 0.3, 0.5, 0.7. Seconds: Iris (read, preprocess, predict,
export) and registration (registration and warping), one thread each.

Run: python benchmarks/registration_fusion.py [-m MODEL] --held_out FILE --dataset 4 --queries 11 [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402 - the registration baseline and the case picking, shared

from iris_nnu.errors import cli_entry  # noqa: E402
from iris_nnu.files import write_json_atomic  # noqa: E402
from iris_nnu.inference import IrisPredictor, parse_reference  # noqa: E402
from iris_nnu.inference.evaluate import dice_per_class  # noqa: E402
from iris_nnu.inference.names import dataset_json_names  # noqa: E402
from iris_nnu.inference.registration import deformable_transform, warp_masks  # noqa: E402
from iris_nnu.inference.strategies import calibrated_threshold  # noqa: E402

WEIGHTS = (0.3, 0.5, 0.7)
GATES = (0.1, 0.3)  # fused at 0.5, except classes whose Iris and registered masks overlap less (Dice): Iris alone


def labels_from(probabilities: np.ndarray, classes: list[int], threshold: float) -> np.ndarray:
    """The most probable class where its probability exceeds `threshold`, else 0."""
    return np.where(probabilities.max(0) > threshold, np.asarray(classes)[probabilities.argmax(0)], 0)


@cli_entry("benchmarks/registration_fusion.py")
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", help="model folder (default: the bundled model)")
    p.add_argument("--data", default=os.environ.get("IRIS_DATA", "../shared/data"))
    p.add_argument("--held_out", required=True, help="JSON {dataset: [held-out cases]}")
    p.add_argument("--dataset", default="4")
    p.add_argument("--queries", type=int, default=11)
    p.add_argument("--modality", default="other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="registration_fusion.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    folder = accuracy.find_dataset(Path(args.data), args.dataset)
    held_out = json.loads(Path(args.held_out).read_text())[folder.name]
    queries, refs = accuracy.pick_cases(folder, held_out, args.queries, 1, args.seed)
    classes = sorted(dataset_json_names(str(folder)))
    predictor = IrisPredictor(device="cpu", modality=args.modality)
    predictor.initialize_from_model_folder(args.m)
    reference = (accuracy.image_file(folder, refs[0]), accuracy.label_file(folder, refs[0]))
    cases = parse_reference(f"{reference[0]}:{reference[1]}", 1)
    encoded = predictor.encode_references(cases)
    task, _ = predictor.task_for_strategy(encoded.pool, "oneshot", encoded)
    threshold, self_dice, _ = calibrated_threshold(predictor, cases, task, per_class=False)  # as measured
    predictor.decision_threshold = threshold
    reference_image, reference_label = (sitk.ReadImage(f) for f in reference)
    reference_labels = sitk.GetArrayFromImage(reference_label)
    rows = []
    for case in queries:
        fixed = sitk.ReadImage(accuracy.image_file(folder, case))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(accuracy.label_file(folder, case)))
        start = time.perf_counter()
        result = predictor.predict_case([accuracy.image_file(folder, case)], task, save_probabilities=True)
        iris_s = time.perf_counter() - start
        transform = deformable_transform(fixed, reference_image, seed=args.seed)
        registered = warp_masks(transform, fixed, reference_labels, classes, reference_image.GetSpacing(),
                                reference_image.GetOrigin(), reference_image.GetDirection())
        registration_s = time.perf_counter() - start - iris_s
        iris = result.probabilities.astype(np.float32)[[result.classes.index(c) for c in classes]]
        row = {"case": case, "iris_s": iris_s, "registration_s": registration_s,
               "iris": dice_per_class(truth, result.segmentation, classes),
               "registration": dice_per_class(truth, labels_from(registered, classes, 0.5), classes)}
        for w in WEIGHTS:
            fused = w * iris + (1 - w) * registered
            row[f"fused {w}"] = dice_per_class(truth, labels_from(fused, classes, 0.5), classes)
            row[f"fused {w} at {threshold}"] = dice_per_class(truth, labels_from(fused, classes, threshold), classes)
        agreement = [dice_per_class((iris[k] > threshold).astype(np.uint8), (registered[k] > 0.5).astype(np.uint8),
                                    [1])[1] for k in range(len(classes))]
        row["agreement"] = dict(zip(classes, agreement))
        for gate in GATES:
            disagree = np.asarray([not a >= gate for a in agreement])  # NaN (both empty): nothing to gate
            gated = np.where(disagree[:, None, None, None], iris, 0.5 * iris + 0.5 * registered)
            row[f"fused 0.5 gated {gate}"] = dice_per_class(truth, labels_from(gated, classes, 0.5), classes)
        rows.append(row)
        print(case, {k: round(accuracy.nanmean(list(v.values())), 3) for k, v in row.items() if isinstance(v, dict)},
              f"Iris {iris_s:.1f} s, registration {registration_s:.1f} s", file=sys.stderr, flush=True)
    methods = [k for k in rows[0] if isinstance(rows[0][k], dict) and k != "agreement"]
    summary = {k: {c: accuracy.nanmean([r[k][c] for r in rows]) for c in classes} for k in methods}
    print(f"\nreference {refs[0]}, {len(queries)} queries of {folder.name}, threshold calibrated: {threshold} "
          f"(the reference's own Dice {self_dice[threshold]:.3f}; at 0.5 {self_dice[0.5]:.3f})")
    print("| method | mean Dice | " + " | ".join(str(c) for c in classes) + " |")
    print("|---" * (len(classes) + 2) + "|")
    for k in methods:
        print(f"| {k} | {np.mean(list(summary[k].values())):.3f} | "
              + " | ".join(f"{summary[k][c]:.3f}" for c in classes) + " |")
    print(f"seconds per query: Iris {np.mean([r['iris_s'] for r in rows]):.1f}, registration "
          f"{np.mean([r['registration_s'] for r in rows]):.1f}")
    write_json_atomic(accuracy.json_ready({"command": " ".join(sys.argv), "model": args.m, "reference": refs[0],
                                           "threshold": threshold, "reference_self_dice": self_dice, "rows": rows,
                                           "summary": summary}), args.output)
    return 0


if __name__ == "__main__":
    main()
