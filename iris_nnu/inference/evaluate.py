"""`iris_evaluate`: per-class, per-case Dice of predicted segmentations against ground truth, optional PNG overlays.

Per-case metrics are nnU-Net's (`nnunetv2.evaluation.evaluate_predictions.compute_metrics`: Dice, IoU, TP/FP/FN
per label) and the summary file has nnU-Net's summary.json layout (`metric_per_case`, `mean`, `foreground_mean`).
Cases are matched by name, so a prediction may use another file format than its ground truth.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_metrics, save_summary_json
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from iris_nnu.cli import HelpFormatter
from iris_nnu.errors import IrisInputError, cli_entry
from iris_nnu.files import write_atomic
from iris_nnu.inference.images import (
    file_ending,
    read_geometry,
    read_label,
    strip_ending,
)
from iris_nnu.inference.names import dataset_json_names, read_label_names

PROGRAM = "iris_evaluate"


def dice_per_class(gt: np.ndarray, pred: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice = 2TP / (2TP + FP + FN) per class (NaN if absent from both): nnU-Net's compute_tp_fp_fn_tn counts, from
    one confusion matrix (85 classes on a 256x256x160 brain: one pass instead of 85)."""
    if gt.shape != pred.shape:
        raise RuntimeError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    n = int(max(gt.max(), pred.max(), max(classes))) + 1
    confusion = np.bincount(gt.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel(), minlength=n * n)
    confusion = confusion.reshape(n, n)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    return {c: float(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c])) if tp[c] + fp[c] + fn[c] else float("nan")
            for c in classes}


def list_cases(folder: str, what: str) -> dict[str, str]:
    """{case: file} of the images in a folder (any supported ending)."""
    if not os.path.isdir(folder):
        raise IrisInputError(f"{folder}: {what} folder not found")
    cases: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not file_ending(name) or not os.path.isfile(os.path.join(folder, name)):
            continue
        case = strip_ending(name)
        if case in cases:
            raise IrisInputError(f"{os.path.join(folder, name)}: case {case} also in {cases[case]}")
        cases[case] = os.path.join(folder, name)
    return cases


def check_pair(gt: str, pred: str) -> None:
    problem = read_geometry(pred).difference(read_geometry(gt))
    if problem:
        raise IrisInputError(f"{pred}: {problem} from its ground truth {gt}")


def label_values(files: list[str]) -> list[int]:
    rw = SimpleITKIO()
    found: set[int] = set()
    for f in files:
        found |= {int(v) for v in np.unique(read_label(f, rw)) if v != 0}
    return sorted(found)


def _metrics_star(args: tuple) -> dict:
    return compute_metrics(*args)


def evaluate_folders(gt_folder: str, pred_folder: str, labels: list[int] | None = None, num_workers: int = 1,
                     ) -> tuple[dict, list[str]]:
    """nnU-Net-style summary over the cases present in both folders, and the ground-truth cases without prediction."""
    gt, pred = list_cases(gt_folder, "ground-truth"), list_cases(pred_folder, "prediction")
    common = [c for c in gt if c in pred]
    if not common:
        raise IrisInputError(f"no prediction in {pred_folder} matches a ground truth in {gt_folder} by case name "
                             f"({len(gt)} ground truths, {len(pred)} predictions)")
    for case in common:
        check_pair(gt[case], pred[case])
    # every file read once in full here: integer values only (nnU-Net's metrics would count 1.5 as background)
    in_ground_truth = label_values([gt[c] for c in common])
    predicted = label_values([pred[c] for c in common])
    labels = sorted(set(labels)) if labels else in_ground_truth
    if not labels:
        raise IrisInputError(f"{gt_folder}: the ground truths hold no non-zero label; give --labels")
    jobs = [(gt[c], pred[c], SimpleITKIO(), labels) for c in common]
    if num_workers > 1 and len(jobs) > 1:
        # threads, not nnU-Net's spawned processes: reading (SimpleITK) and numpy release the GIL, and a spawned
        # worker spends seconds importing nnunetv2 and torch
        with ThreadPoolExecutor(min(num_workers, len(jobs))) as pool:
            per_case = list(pool.map(_metrics_star, jobs))
    else:
        per_case = [_metrics_star(j) for j in jobs]
    for case, result in zip(common, per_case):
        result["case"] = case
    metric_names = list(per_case[0]["metrics"][labels[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: a class absent from every case
        means = {label: {m: float(np.nanmean([r["metrics"][label][m] for r in per_case])) for m in metric_names}
                 for label in labels}
        foreground = {m: float(np.nanmean([means[label][m] for label in labels])) for m in metric_names}
    # what the metrics leave out, said rather than silently dropped (iris_evaluate warns about each)
    summary = {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground,
               "not_evaluated": {
                   "predicted_labels_absent_from_ground_truth": sorted(set(predicted) - set(in_ground_truth)
                                                                       - set(labels)),
                   "predicted_labels_not_evaluated": sorted(set(predicted) & set(in_ground_truth) - set(labels)),
                   "predictions_without_ground_truth": [pred[c] for c in pred if c not in gt]}}
    recursive_fix_for_json_export(summary)
    return summary, [gt[c] for c in gt if c not in pred]


# ------------------------------------------------------------------------------------------ overlays
def _find_image(images_folder: str, case: str) -> str | None:
    for name in sorted(os.listdir(images_folder)):
        if file_ending(name) and strip_ending(name) in (case, f"{case}_0000"):
            return os.path.join(images_folder, name)
    return None


def write_overlay(gt_file: str, pred_file: str, png: str, labels: list[int], image_file: str | None = None) -> None:
    """Ground truth, prediction and errors (green TP, red FP, blue FN) on the axial slice with most ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rw = SimpleITKIO()
    gt, pred = read_label(gt_file, rw)[0], read_label(pred_file, rw)[0]
    amount = (gt != 0).sum((1, 2)) if (gt != 0).any() else (pred != 0).sum((1, 2))
    z = int(np.argmax(amount))
    background = rw.read_images([image_file])[0][0][z] if image_file else np.zeros(gt.shape[1:])
    colours = ListedColormap(plt.get_cmap("tab20")(np.arange(max(len(labels), 1)) % 20))

    def coloured(seg: np.ndarray) -> np.ma.MaskedArray:
        index = np.searchsorted(labels, seg).clip(max=len(labels) - 1)
        known = (seg != 0) & (np.array(labels)[index] == seg)
        return np.ma.masked_where(~known, index)

    tp = (gt == pred) & (gt != 0)
    errors = np.zeros((*gt.shape[1:], 4))
    errors[tp[z]] = (0, 0.8, 0, 0.8)
    errors[((pred != gt) & (pred != 0))[z]] = (0.9, 0, 0, 0.8)
    errors[((pred != gt) & (gt != 0) & (pred == 0))[z]] = (0, 0.3, 1, 0.8)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, title, layer in ((axes[0], "ground truth", coloured(gt[z])), (axes[1], "prediction", coloured(pred[z])),
                             (axes[2], "TP green / FP red / FN blue", None)):
        ax.imshow(background, cmap="gray")
        if layer is not None:
            ax.imshow(layer, cmap=colours, vmin=0, vmax=max(len(labels) - 1, 1), alpha=0.6, interpolation="nearest")
        else:
            ax.imshow(errors, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{os.path.basename(pred_file)}  (slice {z})")
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Dice (and IoU, TP/FP/FN) per class and per case of predicted segmentations against ground "
                    "truth, matched by case name; writes nnU-Net's summary.json layout.",
        formatter_class=HelpFormatter)
    p.add_argument("-ref", required=True, metavar="GT_FOLDER", help="folder of ground-truth label images")
    p.add_argument("-pred", required=True, metavar="PRED_FOLDER", help="folder of predicted label images")
    p.add_argument("-o", default=None, metavar="SUMMARY_JSON", help="summary file (default: PRED_FOLDER/summary.json)")
    p.add_argument("--labels", nargs="+", type=int, metavar="L",
                   help="label values to evaluate (default: every non-zero value in the ground truths)")
    p.add_argument("--overlays", metavar="DIR", help="also write one PNG per case: ground truth, prediction, errors")
    p.add_argument("--images", metavar="DIR",
                   help="query images ({case}_0000 or {case}) drawn under the overlays")
    p.add_argument("-np", type=int, default=1, help="parallel workers (threads) for the per-case metrics")
    p.add_argument("--label_names", metavar="FILE",
                   help='JSON {"value": "name", ...} naming the structures in the table and the summary (default: '
                        "the labels of a dataset.json in GT_FOLDER or the folder above it, as in nnU-Net's raw "
                        "layout labelsTr/)")
    return p


def evaluation_names(gt_folder: str, label_names: str | None) -> dict[int, str]:
    """{value: name} from a dataset.json in the ground-truth folder or its parent, updated by --label_names."""
    names = dataset_json_names(gt_folder) or dataset_json_names(os.path.dirname(os.path.abspath(gt_folder)))
    return {**names, **(read_label_names(label_names) if label_names else {})}


@cli_entry(PROGRAM)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.np < 1:
        raise IrisInputError(f"-np must be at least 1, got {args.np}")
    for folder, what in ((args.ref, "ground-truth"), (args.pred, "prediction")):
        if not os.path.isdir(folder):
            raise IrisInputError(f"{folder}: {what} folder not found")
    output = args.o or os.path.join(args.pred, "summary.json")
    if not output.endswith(".json"):
        raise IrisInputError(f"-o {output}: the summary file must end with .json")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise IrisInputError(f"-o {output}: folder {os.path.dirname(os.path.abspath(output))} does not exist")
    if args.images and not os.path.isdir(args.images):
        raise IrisInputError(f"--images {args.images}: folder not found")
    if args.labels and min(args.labels) <= 0:
        raise IrisInputError(f"--labels: label values are positive (0 is background), got {min(args.labels)}")
    names = evaluation_names(args.ref, args.label_names)
    summary, missing = evaluate_folders(args.ref, args.pred, args.labels, args.np)
    labels = list(summary["mean"])
    if names:
        summary["label_names"] = {str(label): names[int(label)] for label in labels if int(label) in names}
    write_atomic(output, lambda tmp: save_summary_json(summary, tmp))

    heads = [names.get(int(label), str(label)) for label in labels]
    w = max(9, min(17, max(len(h) for h in heads) + 1))  # a column per structure, headed by its name
    print(f"{'case':<28}" + "".join(f"{h[:w - 1]:>{w}}" for h in heads))
    for r in summary["metric_per_case"]:
        print(f"{r['case']:<28}" + "".join(f"{r['metrics'][label]['Dice']:>{w}.4f}" for label in labels))
    print(f"{'mean Dice':<28}" + "".join(f"{summary['mean'][label]['Dice']:>{w}.4f}" for label in labels))
    print(f"foreground mean Dice {summary['foreground_mean']['Dice']:.4f} over {len(summary['metric_per_case'])} "
          f"case(s); summary written to {output}")
    if args.overlays:
        os.makedirs(args.overlays, exist_ok=True)
        for r in summary["metric_per_case"]:
            image = _find_image(args.images, r["case"]) if args.images else None
            write_overlay(r["reference_file"], r["prediction_file"], os.path.join(args.overlays, r["case"] + ".png"),
                          labels, image)
        print(f"overlays written to {args.overlays}")
    if missing:
        print(f"{PROGRAM}: warning: {len(missing)} ground truth(s) without prediction, not evaluated: "
              f"{', '.join(os.path.basename(m) for m in missing)}", file=sys.stderr)
    skipped = summary["not_evaluated"]
    extra = skipped["predictions_without_ground_truth"]
    if extra:
        print(f"{PROGRAM}: warning: {len(extra)} prediction(s) without ground truth, not evaluated: "
              f"{', '.join(os.path.basename(m) for m in extra)}", file=sys.stderr)
    if skipped["predicted_labels_absent_from_ground_truth"]:
        print(f"{PROGRAM}: warning: predicted label value(s) "
              f"{' '.join(map(str, skipped['predicted_labels_absent_from_ground_truth']))} are in no ground truth: "
              f"every such voxel is a false positive that no Dice above counts (give them with --labels to score "
              f"them)", file=sys.stderr)
    if skipped["predicted_labels_not_evaluated"]:
        print(f"{PROGRAM}: note: predicted label value(s) "
              f"{' '.join(map(str, skipped['predicted_labels_not_evaluated']))} left out by --labels", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
