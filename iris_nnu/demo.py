"""`iris_demo`: segment real held-out scans with the bundled default model from one real reference, offline.

For each dataset of the shared data (nnU-Net raw format) the default model trained on: the first training case of
the default model is the reference, the first held-out cases (never seen in training) are the queries; for those of
DEMO_CASES, the benchmarks' reference and held-out queries (cases the model never saw, or a dataset it never trained
on). Writes each segmentation, an overlay PNG and nnU-Net's metrics summary, and prints Dice per structure. Without
a data folder it runs on the cases bundled in the package (iris_nnu/demo_data, packed by scripts/pack_demo_data.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence

import numpy as np

from iris_nnu.cli import HelpFormatter
from iris_nnu.device import add_device_argument, resolve_device
from iris_nnu.errors import IrisInputError, cli_entry
from iris_nnu.files import write_json_atomic
from iris_nnu.inference.evaluate import evaluate_folders, write_overlay
from iris_nnu.inference.export import describe_threshold
from iris_nnu.inference.images import Query
from iris_nnu.inference.names import dataset_json_names
from iris_nnu.inference.predictor import IrisPredictor
from iris_nnu.inference.references import ReferenceCase
from iris_nnu.inference.strategies import (AUTO_FUSION, AUTO_POSTPROCESS, AUTO_STEP, AUTO_THRESHOLD, apply_fusion,
                                          raised_for_hidden_edges, run_threshold)
from iris_nnu.io.model_folder import read_held_out
from iris_nnu.model import TaskEmbedding
from iris_nnu.preprocessing.raw_dataset import raw_case_files, training_cases

PROGRAM = "iris_demo"
# real cases shipped in the package: held-out hippocampus crops of the default model (MSD Task04, CC-BY-SA 4.0), and a
# reference and a query each of head-and-neck CT (OpenKBP, CC BY) and abdominal MR (CHAOS, CC BY-SA 4.0)
BUNDLED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")
# datasets whose demo reference and queries are fixed: those of benchmarks/accuracy.py on the 4-member split (its
# reference, the split's held-out cases), whether or not the default model trained on the dataset; bundled: the
# reference and the first query (OpenKBP head-and-neck CT, CC BY; CHAOS T2-SPIR, CC BY-SA 4.0). Not every CT case
# holds all five organs: the first training case would not show them all
DEMO_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Dataset003_HeadNeckCT": ("headneck_train_034", ("headneck_train_007", "headneck_train_025", "headneck_train_026",
                                                     "headneck_train_035", "headneck_train_037", "headneck_train_040")),
    "Dataset004_AbdomenMR": ("abdomen_010", ("abdomen_001", "abdomen_005", "abdomen_019"))}


def demo_datasets(held_out: dict[str, list[str]]) -> list[str]:
    """The datasets the demo segments: those the default model trained on, then those of DEMO_CASES it did not."""
    return [*held_out, *(name for name in DEMO_CASES if name not in held_out)]


def default_data_folder() -> str:
    """$IRIS_DATA, else ../shared/data beside the current folder (where CI and the quick start keep it)."""
    return os.environ.get("IRIS_DATA") or os.path.join(os.getcwd(), "..", "shared", "data")


def data_folder(given: str | None, datasets: list[str]) -> tuple[str, bool]:
    """(folder, whether it is the bundled demo data): --data, else $IRIS_DATA, else ../shared/data when it holds one
    of `datasets`, else the cases bundled in the package."""
    if given or os.environ.get("IRIS_DATA"):
        return os.path.abspath(given or os.environ["IRIS_DATA"]), False
    shared = os.path.abspath(default_data_folder())
    if any(os.path.isdir(os.path.join(shared, name, "labelsTr")) for name in datasets):
        return shared, False
    return BUNDLED_DATA, True


def describe(dice: dict[int, float], names: dict[int, str], show: int = 3, unlabelled: Sequence[int] = ()) -> str:
    """'mean 0.71 over 2 structures: anterior 0.69, posterior 0.73' (best and worst `show` when there are many), then
    the `unlabelled` classes: those the query's ground truth lacks, left out of the mean."""
    valid = {label: d for label, d in dice.items() if not np.isnan(d)}
    mean = float(np.mean(list(valid.values()))) if valid else float("nan")
    ranked = sorted(valid, key=valid.get, reverse=True)
    if len(ranked) <= 2 * show:
        parts = ", ".join(f"{names.get(label, label)} {valid[label]:.2f}" for label in ranked)
    else:
        best = ", ".join(f"{names.get(label, label)} {valid[label]:.2f}" for label in ranked[:show])
        worst = ", ".join(f"{names.get(label, label)} {valid[label]:.2f}" for label in ranked[-show:])
        parts = f"best {best}; worst {worst}"
    missing = f"; not labelled in this query: {', '.join(str(names.get(label, label)) for label in unlabelled)}" \
        if unlabelled else ""
    return f"mean Dice {mean:.3f} over {len(valid)} structures ({parts}){missing}"


def oneshot_task(predictor: IrisPredictor, reference: ReferenceCase) -> TaskEmbedding:
    """The one-shot task of `reference`, the predictor set to fuse with its registration, and to its calibrated window
    step, decision threshold and largest components (as iris_predict's defaults with one reference:
    --registration_fusion auto, -step_size auto, --threshold auto and --postprocess auto)."""
    apply_fusion(predictor, AUTO_FUSION, [reference])
    references = predictor.encode_references([reference])
    task, _ = predictor.task_for_strategy(references.pool, "oneshot", references)
    predictor.decision_threshold, _ = run_threshold(predictor, AUTO_THRESHOLD, task, [reference], AUTO_STEP,
                                                    AUTO_POSTPROCESS)
    return task


def demo_cases(raw_folder: str, held_out: list[str]) -> tuple[str, list[str]]:
    """(reference, queries) of a dataset: for one the default model trained on, its first training case and its
    held-out cases; for DEMO_CASES, theirs."""
    name = os.path.basename(raw_folder)
    if name in DEMO_CASES:
        reference, queries = DEMO_CASES[name]
        return reference, list(queries)
    training = training_cases(raw_folder, held_out)
    if not training:
        raise IrisInputError(f"{raw_folder}: holds no training case of the default model (its held_out.json); "
                             f"bundled cases are refreshed by scripts/pack_demo_data.py")
    return training[0], held_out


def run_dataset(predictor: IrisPredictor, raw_folder: str, held_out: list[str], output: str,
                num_queries: int | None) -> tuple[dict, float]:
    """Segment the first queries of one dataset (all it holds for None) from its reference (demo_cases); returns
    the summary (nnU-Net's) and the mean over queries of each query's Dice over the classes its ground truth holds."""
    name = os.path.basename(raw_folder)
    reference, candidates = demo_cases(raw_folder, held_out)
    present = [case for case in candidates
               if os.path.isfile(os.path.join(raw_folder, "labelsTr", f"{case}.nii.gz"))][:num_queries]
    if not present or not os.path.isfile(os.path.join(raw_folder, "labelsTr", f"{reference}.nii.gz")):
        raise IrisInputError(f"{raw_folder}: holds {'no query' if not present else 'not the reference ' + reference}"
                             f" of the demo; bundled cases are refreshed by scripts/pack_demo_data.py")
    ref_image, ref_label = raw_case_files(raw_folder, reference)
    predictor.use_modality(predictor.detect_modality([ref_image])[0])  # as iris_predict's --modality auto
    task = oneshot_task(predictor, ReferenceCase(reference, [ref_image], ref_label))
    queries = [Query(case, [raw_case_files(raw_folder, case)[0]]) for case in present]
    out = os.path.join(output, name)
    kind = "held-out" if held_out else "a dataset the default model never trained on"
    counted = f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}"
    raised = raised_for_hidden_edges(predictor, task.classes)
    hidden = (f" (its weight x{predictor.hidden_edge_factor:g} for {len(raised)} structure(s) whose edges the reference "
              f"hides)" if raised else "")
    print(f"{PROGRAM}: {name}: reference {reference} ({len(task.classes)} structures, modality {predictor.modality}, "
          f"window step {predictor.tile_step_size}, decision threshold "
          f"{describe_threshold(predictor.decision_threshold)}, largest component alone for "
          f"{len(predictor.largest_component)}, {'fused with' if predictor.registration_fusion else 'without'} its "
          f"registration{hidden}), {counted} ({kind})")
    failures = predictor.predict_queries(queries, out, task, progress=False)
    if failures:
        raise IrisInputError("; ".join(failures))
    summary, _ = evaluate_folders(os.path.join(raw_folder, "labelsTr"), out, labels=list(task.classes))
    write_json_atomic(summary, os.path.join(out, "summary.json"))
    names = dataset_json_names(raw_folder)
    means = []
    for result in summary["metric_per_case"]:
        case = result["case"]
        png = os.path.join(out, f"{case}.png")
        write_overlay(result["reference_file"], result["prediction_file"], png, list(task.classes),
                      raw_case_files(raw_folder, case)[0])
        # a class the query's truth lacks (not every head-and-neck CT has every organ labelled) is left out, as in
        # benchmarks/accuracy.py: nnU-Net's summary scores it 0 wherever the network marks the organ that is there
        dice = {int(label): float(m["Dice"]) for label, m in result["metrics"].items() if m["n_ref"] > 0}
        unlabelled = [int(label) for label, m in result["metrics"].items() if m["n_ref"] == 0]
        print(f"{PROGRAM}:   {case}: {describe(dice, names, unlabelled=unlabelled)}\n"
              f"{PROGRAM}:     segmentation {result['prediction_file']}, overlay {png}")
        if dice:  # a class the truth holds always has a Dice (nnU-Net's is NaN only where both are empty)
            means.append(float(np.mean(list(dice.values()))))
    return summary, float(np.mean(means)) if means else float("nan")


def run_dicom(predictor: IrisPredictor, raw_folder: str, held_out: list[str], output: str) -> None:
    """The clinical path offline: the first held-out query written as a DICOM MR series, segmented as iris_predict
    does a DICOM query (--output_type both: NIfTI and DICOM-SEG), the SEG read back and checked."""
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk

    from iris_nnu.inference.dicom_output import write_dicom_series
    from iris_nnu.inference.images import dicom_series_files, read_dicom_series
    from iris_nnu.inference.outputs import write_query_outputs

    reference = training_cases(raw_folder, held_out)[0]
    case = next(c for c in held_out if os.path.isfile(os.path.join(raw_folder, "labelsTr", f"{c}.nii.gz")))
    image, truth = raw_case_files(raw_folder, case)
    out = os.path.join(output, "dicom")
    series = os.path.join(out, "series", case)
    if os.path.isdir(series):
        shutil.rmtree(series)  # the demo's own series from an earlier run
    write_dicom_series(sitk.ReadImage(image), series, series_description=f"iris-nnu demo {case}")
    print(f"{PROGRAM}: DICOM: {case} written as a DICOM MR series of {len(os.listdir(series))} slices in {series}")
    ref_image, ref_label = raw_case_files(raw_folder, reference)
    predictor.use_modality(predictor.detect_modality([ref_image])[0])
    task = oneshot_task(predictor, ReferenceCase(reference, [ref_image], ref_label))
    query = Query(case, [series])
    failures = predictor.predict_queries([query], out, task, progress=False)
    if failures:
        raise IrisInputError("; ".join(failures))
    nifti = os.path.join(out, case + query.output_ending)
    write_query_outputs(query, nifti, out, ("dicom_seg",), False, task.classes, dataset_json_names(raw_folder),
                        task.model_id, f"from reference {reference}", predictor.reader_writer_class)
    seg_file = os.path.join(out, f"{case}_seg.dcm")
    seg = hd.seg.segread(seg_file)
    source = read_dicom_series(series)
    order = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in dicom_series_files(series)]
    numbers = list(range(1, len(task.classes) + 1))
    decoded = seg.get_pixels_by_source_instance(order, segment_numbers=numbers, combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    labels = np.array([0, *task.classes])[decoded]
    same = bool(np.array_equal(labels, sitk.GetArrayFromImage(sitk.ReadImage(nifti))))
    # Dice of the SEG's masks against the ground truth, on the ground truth's grid
    decoded_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    decoded_image.CopyInformation(source)
    truth_image = sitk.ReadImage(truth)
    on_truth = sitk.GetArrayFromImage(sitk.Resample(decoded_image, truth_image, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor))
    gt = sitk.GetArrayFromImage(truth_image)
    dice = {c: 2 * ((on_truth == c) & (gt == c)).sum() / max((on_truth == c).sum() + (gt == c).sum(), 1)
            for c in task.classes}
    segments = ", ".join(seg.get_segment_description(n).segment_label for n in numbers)
    print(f"{PROGRAM}: DICOM: {seg_file}: DICOM-SEG of {len(numbers)} segments ({segments}), {seg.NumberOfFrames} "
          f"frames referencing series {seg.ReferencedSeriesSequence[0].SeriesInstanceUID}; decoded, it equals the "
          f"NIfTI output: {'yes' if same else 'NO'}; {describe(dice, dataset_json_names(raw_folder))}")
    names_file = os.path.join(out, "label_names.json")
    write_json_atomic({str(v): n for v, n in dataset_json_names(raw_folder).items()}, names_file)
    print(f"{PROGRAM}: DICOM: the same with iris_predict: iris_predict -i {os.path.dirname(series)} -o {out} "
          f"-r {ref_image}:{ref_label} --label_names {names_file} --output_type both --overwrite")
    if not same:
        raise IrisInputError(f"{seg_file}: its segments differ from {nifti}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Segment real MR and CT scans the default model bundled with iris-nnu never saw, from one "
                    "real reference each (no training, no network access): held-out hippocampus crops (2 "
                    "structures), OASIS brains (85 structures), head-and-neck CT (5 organs) and abdominal MR "
                    "(liver, kidneys), of a data folder, or, without one, the cases bundled with iris-nnu. Each "
                    "reference's modality is read from its intensities (as iris_predict --modality auto). Writes "
                    "segmentations, overlay PNGs and metrics, and prints Dice.",
        formatter_class=HelpFormatter)
    p.add_argument("--data", default=None,
                   help="folder holding Dataset001_Hippocampus, Dataset002_OASISBrain, Dataset003_HeadNeckCT and/or "
                        "Dataset004_AbdomenMR in nnU-Net raw format (default: $IRIS_DATA, else ../shared/data if it "
                        "holds one; else the cases bundled in the package, iris_nnu/demo_data)")
    p.add_argument("-o", default="iris_demo_output", metavar="OUTPUT", help="output folder")
    p.add_argument("--queries", type=int, default=None,
                   help="queries per dataset (default: 1 from a data folder, all bundled ones: 3 hippocampus "
                        "crops, 1 head-and-neck CT, 1 abdomen)")
    p.add_argument("--dicom", action="store_true",
                   help="also the clinical path: the first held-out hippocampus query written as a DICOM MR series "
                        "(OUTPUT/dicom/series), segmented as a DICOM query and written as DICOM-SEG "
                        "(OUTPUT/dicom/{case}_seg.dcm, highdicom), read back and checked against the NIfTI output")
    add_device_argument(p)
    return p


@cli_entry(PROGRAM)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.queries is not None and args.queries < 1:
        raise IrisInputError(f"--queries must be at least 1, got {args.queries}")
    held_out = read_held_out(None)
    datasets = demo_datasets(held_out)
    data, bundled = data_folder(args.data, datasets)
    found = [os.path.join(data, name) for name in datasets if os.path.isdir(os.path.join(data, name, "labelsTr"))]
    if bundled:
        print(f"{PROGRAM}: no data folder (--data, $IRIS_DATA or ../shared/data): segmenting the cases bundled with "
              f"iris-nnu ({data}; their sources and licences in ATTRIBUTION.md there): "
              f"{', '.join(os.path.basename(f) for f in found)}")
    if not found:
        raise IrisInputError(f"{data}: holds none of {', '.join(datasets)} (nnU-Net raw format); set --data or "
                             f"IRIS_DATA to the folder that does")
    predictor = IrisPredictor(device=resolve_device(args.device))
    predictor.initialize_from_model_folder(None)
    means = {}
    for raw_folder in found:
        _, means[os.path.basename(raw_folder)] = run_dataset(
            predictor, raw_folder, held_out.get(os.path.basename(raw_folder), []), args.o,
            args.queries if args.queries or bundled else 1)
    hippocampus = [f for f in found if os.path.basename(f) == "Dataset001_Hippocampus"]
    if args.dicom:
        if not hippocampus:
            raise IrisInputError(f"--dicom: {data} holds no Dataset001_Hippocampus")
        run_dicom(predictor, hippocampus[0], held_out["Dataset001_Hippocampus"], args.o)
    print(f"{PROGRAM}: done; mean Dice " + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
          + f"; outputs in {os.path.abspath(args.o)}")
    return 0


if __name__ == "__main__":
    main()
