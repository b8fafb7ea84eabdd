"""Accuracy and speed of Iris inference strategies against registration baselines, on held-out real cases.

Methods, on the same queries and references (reference #1 is the first of --n_references cases picked with --seed
from the model's training cases of each dataset, i.e. imagesTr minus the held-out cases):
  iris oneshot      reference #1                      iris ensemble-5   the 5 references averaged per class
  iris retrieval-5  per class, the closest reference  iris tune         reference #1, its task embedding tuned
  registration      reference #1 registered to the query (SimpleITK: affine, then B-spline, Mattes MI, then demons
                    on a 3 mm grid and a finer one unless --demons_iterations 0), label warped
  ants syn          reference #1 registered with ANTs SyN (antspyx, optional: `pip install antspyx`), label warped
  iris oneshot 1/pass  as oneshot, one class per forward pass (all classes in one pass should do as well)
  multi-atlas-5     the 5 references registered, per-voxel majority vote
  box alignment     reference #1's label carried over by mapping the scans' non-zero boxes onto each other
  iris oneshot no position prior   as oneshot, from the image alone (iris_predict --no_position_prior)
  iris oneshot calibrated   as oneshot, each class's decision threshold the reference's own segmentation scores
                            best at (iris_predict's default, --threshold auto; its time is part of "encode s"), and
                            the largest component alone of the classes it scores better (--postprocess auto)
  iris oneshot calibrated, whole classes   as oneshot calibrated, every component kept (--postprocess none)
  iris oneshot calibrated, one threshold   as oneshot calibrated, one threshold for all classes (as before 2026-12)
  iris tune calibrated      as tune, then the threshold calibrated with the tuned task (--strategy tune)
  iris oneshot fused with registration   as oneshot calibrated, each class's logit moved by reference #1's label
                            carried onto the query by the registration above (--registration_fusion on)
  iris oneshot, fusion auto as oneshot: the network alone, fused, or the registration alone, as reference #2
                            segmented from #1 says, a query that registers badly by the network alone (iris_predict's
                            --registration_fusion auto with two references; needs --n_references 2 or more)
Queries: the first --queries held-out cases (never trained on) per dataset, from --held_out (default
<model folder>/held_out.json: {"Dataset001_Hippocampus": ["hippocampus_026", ...], ...}).
Dice per class on the query's own grid against labelsTr; NaN (left out of means) where the query's labelsTr lacks
the class (the structure may be there unlabelled: not every head-and-neck CT has every organ labelled). "mean Dice"
averages the per-class means over queries. For a model whose training held structures out of every episode
(plans' "iris" "held_out_classes"), their mean and the other structures' are reported apart ("never trained on",
"trained on").
Seconds per query, wall clock: Iris = read + preprocess + predict + export (the label file written), the task
encoded beforehand ("encode s", once per method; tune's optimisation is part of it); registration = the
registration(s) + warping + vote. Multi-atlas reuses the single-atlas registration of reference #1 (same inputs and
seed) and counts its time.

Run: python benchmarks/accuracy.py -m MODEL_FOLDER [-chk CHECKPOINT] [--datasets 1 2] [--queries 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from iris_nnu.errors import IrisInputError, cli_entry  # noqa: E402
from iris_nnu.files import write_json_atomic  # noqa: E402
from iris_nnu.inference import IrisPredictor, parse_reference  # noqa: E402
from iris_nnu.inference.evaluate import dice_per_class  # noqa: E402
from iris_nnu.inference.images import write_segmentation  # noqa: E402
from iris_nnu.inference.names import dataset_json_names  # noqa: E402
from iris_nnu.inference.predictor import DEFAULT_PRIOR_ALIGNMENT  # noqa: E402
from iris_nnu.inference import registration  # noqa: E402
from iris_nnu.inference.registration import (  # noqa: E402
    BSPLINE_ITERATIONS,
    BSPLINE_MESH,
    DEMONS_SMOOTHING,
    DEMONS_SPACING_MM,
    FINE_DEMONS,
    FINE_DEMONS_VOXELS,
    MAX_SAMPLES,
    MIN_GRID_VOXELS,
    SAMPLING,
    register_label,
)
from iris_nnu.inference.plans import AUTO_MODALITY, MODALITIES  # noqa: E402
from iris_nnu.inference.segmenter import DEFAULT_PRECISION, PRECISIONS  # noqa: E402
from iris_nnu.inference.strategies import (  # noqa: E402
    AUTO_FUSION,
    AUTO_STEP,
    DEFAULT_STEP_SIZE,
    DEFAULT_TUNE_LR,
    DEFAULT_TUNE_STEPS,
    HIDDEN_EDGE_FACTOR,
    calibrated_threshold,
    calibrated_window,
    run_fusion,
    set_fusion,
)
from iris_nnu.io.model_folder import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL_FOLDER,
    HELD_OUT_FILE,
    read_held_out,
)
from iris_nnu.preprocessing.raw_dataset import raw_case_files, training_cases  # noqa: E402

PROGRAM = "benchmarks/accuracy.py"
# subcortical grey-matter structures, recognised by label name (FreeSurfer / Mindboggle naming)
SUBCORTICAL = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala", "Accumbens", "VentralDC")
MAX_CLASS_COLUMNS = 4  # datasets with at most this many classes get one table column per class


# ------------------------------------------------------------------------------------------- registration
def register_label_ants(fixed_image: sitk.Image, moving_image: sitk.Image, moving_label: sitk.Image,
                        seed: int) -> sitk.Image:
    """ANTs SyN (antspyx's default `SyN`: affine then symmetric diffeomorphic, Mattes MI), label warped with
    ANTs' genericLabel interpolation onto fixed_image's grid. Optional: pip install antspyx."""
    import ants  # noqa: PLC0415 - optional benchmark dependency, only needed for this method

    def to_ants(image: sitk.Image, dtype: str) -> ants.ANTsImage:
        array = sitk.GetArrayFromImage(image).astype(dtype).transpose(2, 1, 0)  # sitk z,y,x -> ants x,y,z
        direction = np.array(image.GetDirection()).reshape(3, 3)
        return ants.from_numpy(array, origin=list(image.GetOrigin()), spacing=list(image.GetSpacing()),
                               direction=direction)

    fixed, moving = to_ants(fixed_image, "float32"), to_ants(moving_image, "float32")
    out = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=seed)
    warped = ants.apply_transforms(fixed, to_ants(moving_label, "float32"), out["fwdtransforms"],
                                   interpolator="genericLabel")
    result = sitk.GetImageFromArray(np.rint(warped.numpy()).astype(np.int16).transpose(2, 1, 0))
    result.CopyInformation(fixed_image)
    return result


def box_aligned_label(fixed: np.ndarray, moving: np.ndarray, moving_label: np.ndarray) -> np.ndarray:
    """moving_label carried onto fixed's grid by mapping the scans' non-zero boxes onto each other, axis by axis
    (nearest neighbour): what Iris's position prior alone knows of where a structure lies."""
    def box(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nonzero = np.argwhere(image != 0)
        return (nonzero.min(0), nonzero.max(0) + 1) if len(nonzero) else (np.zeros(3), np.array(image.shape))

    (flo, fhi), (mlo, mhi) = box(fixed), box(moving)
    axes = [np.clip(np.round(mlo[a] + (np.arange(fixed.shape[a]) + 0.5 - flo[a]) / (fhi[a] - flo[a])
                             * (mhi[a] - mlo[a]) - 0.5), 0, moving.shape[a] - 1).astype(int) for a in range(3)]
    out = moving_label[np.ix_(*axes)]
    inside = np.zeros(fixed.shape, bool)
    inside[tuple(slice(int(lo), int(hi)) for lo, hi in zip(flo, fhi))] = True
    return np.where(inside, out, 0)


def labelled_dice(gt: np.ndarray, pred: np.ndarray, classes: list[int], labelled: set[int] | None = None,
                  ) -> dict[int, float]:
    """Dice per class, NaN for a class the truth lacks (`labelled`: its values, where the caller has them): the
    structure may be there unlabelled (not every head-and-neck CT has every organ labelled), and a method that marks
    it would score 0 where one that misses it scores nothing."""
    labelled = set(np.unique(gt).tolist()) if labelled is None else labelled
    return {c: d if c in labelled else float("nan") for c, d in dice_per_class(gt, pred, classes).items()}


def majority_vote(labels: list[np.ndarray]) -> np.ndarray:
    """Per voxel, the label most maps agree on; a tie goes to the lowest tied label value (background if tied)."""
    stack = np.stack(labels)
    votes = sum((stack == stack[j]).astype(np.int32) for j in range(len(labels)))  # votes for each map's own label
    winner = (votes * 2**20 - stack.astype(np.int32)).argmax(0)  # most votes, then the lowest value
    return np.take_along_axis(stack, winner[None], 0)[0]


# ------------------------------------------------------------------------------------------- evaluation
def nanmean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of nothing: NaN
        return float(np.nanmean(values)) if len(values) else float("nan")


# ------------------------------------------------------------------------------------------- cases
def find_dataset(data: Path, key: str) -> Path:
    """A dataset folder by id ('1', '001') or name ('Dataset001_Hippocampus', 'Hippocampus')."""
    folders = sorted(p for p in data.glob("Dataset[0-9][0-9][0-9]_*") if p.is_dir())
    for p in folders:
        if key in (p.name, p.name.split("_", 1)[1]) or (key.isdigit() and int(key) == int(p.name[7:10])):
            return p
    raise IrisInputError(f"--datasets {key}: no such dataset in {data} ({', '.join(p.name for p in folders)})")


def pick_cases(folder: Path, held_out: list[str], queries: int, references: int, seed: int,
               chosen: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The first `queries` held-out cases, and `references` training cases picked with `seed` among those whose label
    holds every class of the dataset (if there are enough; a reference without an organ cannot show it to any method:
    32 of the 60 head-and-neck CTs hold all 5 organs, one holds none), else among those with a non-empty label;
    `chosen` (--references) names them instead."""
    training = training_cases(str(folder), held_out)
    missing = [c for c in held_out if not (folder / "labelsTr" / f"{c}.nii.gz").is_file()]
    if missing:
        raise IrisInputError(f"held-out case(s) {', '.join(missing[:5])} not in {folder}/labelsTr")
    if chosen:
        unknown = [c for c in chosen if c not in training]
        if unknown:
            raise IrisInputError(f"--references {' '.join(unknown)}: not training cases of {folder.name} (a held-out "
                                 f"case or no such case)")
        if len(chosen) < references:
            raise IrisInputError(f"--references names {len(chosen)} case(s), --n_references asks {references}")
        return held_out[:queries], list(chosen)
    classes = set(dataset_json_names(str(folder)))
    held = {c: set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_file(folder, c)))).tolist()) - {0}
            for c in training}
    complete = [c for c in training if held[c] >= classes]
    training = complete if len(complete) >= references else [c for c in training if held[c]]
    if len(training) < references:
        raise IrisInputError(f"{folder.name}: {len(training)} training cases, {references} references asked")
    picked = np.random.default_rng(seed).choice(len(training), references, replace=False)
    return held_out[:queries], [training[i] for i in picked]


def image_file(folder: Path, case: str) -> str:
    return raw_case_files(str(folder), case)[0]


def label_file(folder: Path, case: str) -> str:
    return raw_case_files(str(folder), case)[1]


# ------------------------------------------------------------------------------------------- the run
def run_dataset(args: argparse.Namespace, predictor: IrisPredictor, folder: Path, held_out: list[str]) -> dict:
    """Every method on every query of one dataset: Dice per class and seconds per query."""
    queries, refs = pick_cases(folder, held_out, args.queries, args.n_references, args.seed, args.references)
    names = dataset_json_names(str(folder))
    classes = sorted(names)
    n = args.n_references
    cases = [case for r in refs for case in parse_reference(f"{image_file(folder, r)}:{label_file(folder, r)}", 1)]
    if args.modality == AUTO_MODALITY:  # as iris_predict: from the first reference
        modality, line = predictor.detect_modality([image_file(folder, refs[0])])
        predictor.use_modality(modality)
        print(f"[{folder.name}] {line}", file=sys.stderr)
    methods: dict[str, dict] = {}
    base_step = DEFAULT_STEP_SIZE if args.step_size == AUTO_STEP else args.step_size
    # method name -> (--methods option, strategy, references, classes per pass, largest component only,
    # position prior, mirrored TTA, prior alignment)
    default = DEFAULT_PRIOR_ALIGNMENT
    iris = {"iris oneshot": ("oneshot", "oneshot", 1, None, False, True, False, default),
            "iris oneshot frames prior": ("oneshot-frames", "oneshot", 1, None, False, True, False, "frames"),
            "iris oneshot affine prior": ("oneshot-affine", "oneshot", 1, None, False, True, False, "affine"),
            "iris oneshot 1/pass": ("oneshot-1-per-pass", "oneshot", 1, 1, False, True, False, default),
            "iris oneshot 8/pass": ("oneshot-8-per-pass", "oneshot", 1, 8, False, True, False, default),
            "iris oneshot largest component": ("oneshot-largest-component", "oneshot", 1, None, True, True, False,
                                               default),
            "iris oneshot no position prior": ("oneshot-no-position", "oneshot", 1, None, False, False, False, default),
            "iris oneshot mirrored TTA": ("oneshot-tta", "oneshot", 1, None, False, True, True, default),
            "iris oneshot calibrated": ("oneshot-calibrated", "oneshot", 1, None, "auto", True, False, default),
            "iris oneshot calibrated, whole classes": ("oneshot-calibrated-whole", "oneshot", 1, None, False, True,
                                                       False, default),
            "iris oneshot calibrated, one threshold": ("oneshot-calibrated-single", "oneshot", 1, None, False, True,
                                                       False, default),
            f"iris ensemble-{n}": ("ensemble", "ensemble", n, None, False, True, False, default),
            f"iris ensemble-{n} frames prior": ("ensemble-frames", "ensemble", n, None, False, True, False, "frames"),
            f"iris retrieval-{n}": ("retrieval", "retrieval", n, None, False, True, False, default),
            "iris tune": ("tune", "tune", 1, None, False, True, False, default),
            "iris tune calibrated": ("tune-calibrated", "tune", 1, None, False, True, False, default),
            "iris oneshot fused with registration": ("oneshot-fused", "oneshot", 1, None, "auto", True, False, default),
            "iris oneshot, fusion auto": ("oneshot-auto", "oneshot", 1, None, "auto", True, False, default)}
    for name, (option, strategy, k, per_pass, largest_component, position, tta, alignment) in iris.items():
        if option in args.methods:
            start = time.perf_counter()  # mirrors iris_predict: encode, task for the strategy, pool for retrieval
            predictor.use_mirroring = tta
            predictor.prior_alignment = alignment
            fusion, floor, decision = ("on" if option.endswith("-fused") else "off"), None, None
            if option == "oneshot-auto":  # iris_predict's default with two references: reference #2 decides
                fusion, floor, decision = run_fusion(predictor, AUTO_FUSION, cases[:2])
            set_fusion(predictor, fusion, floor)  # its references keep their atlases
            encoded = predictor.encode_references(cases[:k])
            task, losses = predictor.task_for_strategy(encoded.pool, strategy, encoded, args.tune_steps, args.tune_lr)
            threshold, calibration, step, steps, own = 0.5, None, base_step, None, None
            # --threshold auto: calibrated unless every class is by the registration alone (run_threshold), with
            # -step_size auto the step too
            if "-calibrated" in option or (option in ("oneshot-fused", "oneshot-auto") and fusion != "registration"):
                per_class = not option.endswith("-single")
                if args.step_size == AUTO_STEP:
                    window = calibrated_window(predictor, cases[:k], task, per_class=per_class)
                    threshold, step, steps = window.threshold, window.step, window.dice
                    calibration, own = steps[step], {s: c.own for s, c in window.calibrations.items()}
                    components = window.calibrations[step].largest_component
                else:
                    threshold, calibration, own, components = calibrated_threshold(predictor, cases[:k], task,
                                                                                   per_class=per_class)
                if largest_component == "auto":  # iris_predict --postprocess auto: as the references say
                    largest_component = components
            largest_component = () if largest_component == "auto" else largest_component  # not calibrated: none
            methods[name] = {"encode_s": time.perf_counter() - start, "tune_losses": losses, "lost": encoded.lost,
                             "threshold": threshold, "reference_dice_by_threshold": calibration, "step_size": step,
                             "reference_dice_by_step": steps, "reference_dice_as_calibrated": own,
                             "classes_per_pass": per_pass, "largest_component": largest_component,
                             "position_prior": position, "tta": tta, "prior_alignment": alignment,
                             "registration_fusion": fusion, "similarity_floor": floor, "fusion_decision": decision,
                             "anchors": encoded.anchors, "atlases": encoded.atlases,
                             "task": task, "pool": encoded.pool if strategy == "retrieval" else None, "per_query": {}}
            print(f"[{folder.name}] {name}: task encoded in {methods[name]['encode_s']:.1f} s", file=sys.stderr)
    for option, name in (("registration", "registration"), ("ants-syn", "ants syn"),
                         ("multi-atlas", f"multi-atlas-{n}"), ("box-alignment", "box alignment")):
        if option in args.methods:
            methods[name] = {"encode_s": 0.0, "per_query": {}}
    atlases = [(sitk.ReadImage(image_file(folder, r)), sitk.ReadImage(label_file(folder, r))) for r in refs]
    with tempfile.TemporaryDirectory(prefix="iris_accuracy_") as tmp:
        for qi, case in enumerate(queries, 1):
            gt = sitk.GetArrayFromImage(sitk.ReadImage(label_file(folder, case)))
            labelled = set(np.unique(gt).tolist())  # once per query, for labelled_dice
            fixed = sitk.ReadImage(image_file(folder, case))
            registered: dict[int, tuple[np.ndarray, float]] = {}  # reference index -> warped label, seconds

            def register(i: int) -> tuple[np.ndarray, float]:
                if i not in registered:
                    start = time.perf_counter()
                    warped = register_label(fixed, *atlases[i], args.registration_spacing, args.seed)
                    registered[i] = sitk.GetArrayFromImage(warped), time.perf_counter() - start
                return registered[i]

            for name, m in methods.items():
                start, notes = time.perf_counter(), []
                if name.startswith("iris"):
                    predictor.classes_per_pass = m["classes_per_pass"]
                    predictor.largest_component = m["largest_component"]
                    predictor.position_prior = m["position_prior"]
                    predictor.use_mirroring = m["tta"]
                    predictor.decision_threshold, predictor.tile_step_size = m["threshold"], m["step_size"]
                    predictor.prior_alignment, predictor.alignment_anchors = m["prior_alignment"], m["anchors"]
                    set_fusion(predictor, m["registration_fusion"], m["similarity_floor"])
                    predictor.registration_atlases = m["atlases"]
                    result = predictor.predict_case([image_file(folder, case)], m["task"], m["pool"], 1)
                    write_segmentation(result.segmentation, os.path.join(tmp, f"{case}.nii.gz"), result.properties,
                                       result.reader_writer)
                    pred, seconds = result.segmentation, time.perf_counter() - start
                    notes = [w for w in result.warnings if "registration" in w]  # e.g. fell back to the network
                elif name == "registration":
                    pred, seconds = register(0)
                elif name == "box alignment":
                    pred = box_aligned_label(sitk.GetArrayFromImage(fixed), *(sitk.GetArrayFromImage(a)
                                                                               for a in atlases[0]))
                    seconds = time.perf_counter() - start
                elif name == "ants syn":
                    warped = register_label_ants(fixed, *atlases[0], args.seed)
                    pred, seconds = sitk.GetArrayFromImage(warped), time.perf_counter() - start
                else:
                    warped = [register(i) for i in range(n)]
                    vote_start = time.perf_counter()
                    pred = majority_vote([w for w, _ in warped])
                    seconds = sum(s for _, s in warped) + time.perf_counter() - vote_start
                dice = labelled_dice(gt, pred, classes, labelled)
                m["per_query"][case] = {"seconds": seconds, "dice": dice, **({"notes": notes} if notes else {})}
                print(f"[{folder.name}] query {qi}/{len(queries)} {case} {name}: mean Dice "
                      f"{nanmean(list(dice.values())):.3f}, {seconds:.1f} s", file=sys.stderr)
    subcortical = [c for c in classes if any(s in names[c] for s in SUBCORTICAL)]
    # the structures the model's training held out of every episode (plans' iris.held_out_classes, by member name)
    never_trained = [c for c in classes
                     if c in predictor.joint_plans.get("iris", {}).get("held_out_classes", {}).get(folder.name, [])]
    for m in methods.values():
        for key in ("task", "pool", "anchors", "atlases"):
            m.pop(key, None)
        per_class = {c: nanmean([q["dice"][c] for q in m["per_query"].values()]) for c in classes}
        m.update(dice_per_class=per_class, mean_dice=nanmean(list(per_class.values())),
                 s_per_query=float(np.mean([q["seconds"] for q in m["per_query"].values()])))
        if subcortical and len(classes) > MAX_CLASS_COLUMNS:
            m["mean_dice_subcortical"] = nanmean([per_class[c] for c in subcortical])
        if never_trained:
            m["mean_dice_never_trained"] = nanmean([per_class[c] for c in never_trained])
            m["mean_dice_trained"] = nanmean([per_class[c] for c in classes if c not in never_trained])
    ratio = (methods["registration"]["s_per_query"] / methods["iris oneshot"]["s_per_query"]
             if {"registration", "iris oneshot"} <= set(methods) else None)
    return {"queries": queries, "references": refs, "class_names": {c: names[c] for c in classes},
            "subcortical_classes": subcortical, "never_trained_classes": never_trained, "methods": methods,
            "registration_over_oneshot": ratio}


def markdown_table(results: dict) -> str:
    """Rows: methods; per dataset: mean Dice, per-class or subcortical Dice, s/query, encode s."""
    head, columns = ["method"], []
    for ds, r in results.items():
        short = ds.split("_", 1)[1]
        columns.append((f"{short} mean Dice", ds, lambda m: m["mean_dice"]))
        if len(r["class_names"]) <= MAX_CLASS_COLUMNS:
            for c, label in r["class_names"].items():
                columns.append((f"{short} {label}", ds, lambda m, c=c: m["dice_per_class"][c]))
        elif r["subcortical_classes"]:
            columns.append((f"{short} subcortical ({len(r['subcortical_classes'])})", ds,
                            lambda m: m["mean_dice_subcortical"]))
        if r["never_trained_classes"]:
            columns.append((f"{short} never trained on ({len(r['never_trained_classes'])})", ds,
                            lambda m: m["mean_dice_never_trained"]))
            columns.append((f"{short} trained on", ds, lambda m: m["mean_dice_trained"]))
        columns.append((f"{short} s/query", ds, lambda m: m["s_per_query"]))
        columns.append((f"{short} encode s", ds, lambda m: m["encode_s"]))
    head += [c[0] for c in columns]
    rows = []
    for method in dict.fromkeys(m for r in results.values() for m in r["methods"]):
        row = [method]
        for title, ds, get in columns:
            m = results[ds]["methods"].get(method)
            row.append("-" if m is None else f"{get(m):.{2 if title.endswith((' s', '/query')) else 3}f}")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def json_ready(obj: object) -> object:
    """NaN -> null, numpy scalars -> Python numbers, int keys -> strings."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if np.isnan(obj) else float(obj)
    return obj.item() if isinstance(obj, np.generic) else obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("IRIS_DATA") or str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    p.add_argument("--data", default=default_data, help="folder of nnU-Net raw datasets (default: $IRIS_DATA or "
                                                        "../shared/data beside the repository)")
    p.add_argument("-m", metavar="MODEL_FOLDER", default=None,
                   help="iris_train model folder (default: the bundled model)")
    p.add_argument("-f", default="0", metavar="FOLD", help="fold of the model")
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT", help="checkpoint file in the fold folder")
    p.add_argument("--held_out", metavar="FILE", help="JSON {dataset: [held-out cases]} (default: MODEL_FOLDER/"
                                                      "held_out.json); queries come from it, references never do")
    p.add_argument("--datasets", nargs="+", default=["1", "2"], help="datasets by id or name")
    p.add_argument("--queries", type=int, default=10, help="at most this many held-out queries per dataset")
    p.add_argument("--n_references", type=int, default=5, help="references of the ensemble, retrieval, multi-atlas")
    p.add_argument("--methods", nargs="+", default=["oneshot", "ensemble", "retrieval", "tune", "registration",
                                                    "multi-atlas"],
                   choices=["oneshot", "oneshot-frames", "oneshot-affine", "oneshot-1-per-pass", "oneshot-8-per-pass", "oneshot-largest-component",
                            "oneshot-no-position", "oneshot-tta", "oneshot-calibrated", "oneshot-calibrated-whole", "oneshot-calibrated-single", "oneshot-fused", "oneshot-auto", "ensemble", "ensemble-frames", "retrieval", "tune",
                            "tune-calibrated",
                            "registration", "ants-syn",
                            "multi-atlas", "box-alignment"],
                   help="oneshot-frames / oneshot-affine: oneshot with the position prior read through the scans' "
                        "frames / an affine registration to the reference (iris_predict --prior_alignment; oneshot "
                        "uses its default), ensemble-frames likewise; oneshot-N-per-pass: oneshot decoding N classes per pass (1: the joint-decoding check; 8: "
                        "as many as a training episode holds); oneshot-largest-component: oneshot keeping each "
                        "class's largest connected component (iris_predict --postprocess largest_component); "
                        "oneshot-no-position: oneshot without the position prior (iris_predict "
                        "--no_position_prior); oneshot-tta: oneshot with mirrored test-time augmentation (iris_predict "
                        "--tta: 8 flips of query and reference together); oneshot-calibrated: oneshot with the decision "
                        "thresholds calibrated on the reference, one per class (iris_predict --threshold auto), "
                        "oneshot-calibrated-whole: oneshot-calibrated without the largest components the references pick (iris_predict --postprocess none); oneshot-calibrated-single: one threshold for all classes, tune-calibrated likewise after tune; oneshot-fused: oneshot-calibrated with reference #1's label registered onto the query adding its evidence to each class's logit (iris_predict --registration_fusion on); oneshot-auto: the network alone, fused or the registration alone as reference #2 segmented from #1 decides, a query registered less alike than 0.8 of #2 by the network alone (--registration_fusion auto); ants-syn: ANTs SyN from reference #1 (needs pip install antspyx); "
                        "box-alignment: reference #1's label carried over by aligning the scans' non-zero boxes "
                        "(what the position prior alone knows)")
    p.add_argument("--seed", type=int, default=0, help="picks the references; seeds the registration sampling")
    p.add_argument("--references", nargs="+", metavar="CASE",
                   help="these training cases as references #1, #2, ... instead of those --seed picks (one dataset)")
    p.add_argument("--modality", choices=(AUTO_MODALITY, *MODALITIES), default=AUTO_MODALITY,
                   help="as iris_predict --modality (auto: per dataset, from its first reference)")
    p.add_argument("--registration_spacing", type=float, default=2.0, metavar="MM",
                   help="grid of the registration optimisation (the label is warped at the query's full resolution)")
    p.add_argument("--demons_iterations", type=int, default=registration.DEMONS_ITERATIONS,
                   help="demons after the registration's B-spline, for the registration baseline and oneshot-fused "
                        "alike (0: none, the registration before they were added)")
    p.add_argument("--fine_demons_iterations", type=int, default=FINE_DEMONS[1],
                   help="demons on the finer grid after those (registration.FINE_DEMONS; 0: none, the registration "
                        "as it was before that level)")
    p.add_argument("--hidden_edge_factor", type=float, default=HIDDEN_EDGE_FACTOR,
                   help="oneshot-fused and oneshot-auto: a fused class whose edge the reference hides takes this many "
                        "times the registration weight (strategies.HIDDEN_EDGE_FACTOR; 1: every class alike, as "
                        "before)")
    p.add_argument("--tune_steps", type=int, default=DEFAULT_TUNE_STEPS)
    p.add_argument("--tune_lr", type=float, default=DEFAULT_TUNE_LR)
    p.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    p.add_argument("-device", choices=("cpu", "cuda"), default="cpu", help="device of Iris (registration: CPU)")
    p.add_argument("-step_size", default="0.5", metavar="S|auto",
                   help="sliding-window step of Iris; auto: chosen with the threshold of the calibrated methods, as "
                        f"iris_predict's default -step_size auto (the other methods: {DEFAULT_STEP_SIZE})")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="as iris_predict --precision (Iris's windows on a CPU)")
    p.add_argument("--output", default="accuracy_results.json", help="JSON of all figures")
    return p


@cli_entry(PROGRAM)
def main() -> int:
    args = build_parser().parse_args()
    if args.queries < 1 or args.n_references < 1 or args.threads < 1:
        raise IrisInputError("--queries, --n_references and --threads must be at least 1")
    data = Path(args.data)
    if not data.is_dir():
        raise IrisInputError(f"{data}: data folder not found (give --data or set $IRIS_DATA)")
    folders = [find_dataset(data, key) for key in args.datasets]
    if args.references and len(folders) > 1:
        raise IrisInputError("--references names cases of one dataset: give one --datasets")
    if "ants-syn" in args.methods:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # read by ANTs when it loads
        try:
            import ants  # noqa: F401, PLC0415
        except ImportError:
            raise IrisInputError("--methods ants-syn needs antspyx (pip install antspyx)") from None
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    registration.DEMONS_ITERATIONS = args.demons_iterations  # what iris_predict's fusion reads at each registration
    registration.FINE_DEMONS = (FINE_DEMONS[0], args.fine_demons_iterations, FINE_DEMONS[2])
    model_folder = os.path.normpath(args.m or DEFAULT_MODEL_FOLDER)
    if args.step_size != AUTO_STEP:
        args.step_size = float(args.step_size)
    # mirroring and the window step are set per method
    predictor = IrisPredictor(tile_step_size=DEFAULT_STEP_SIZE if args.step_size == AUTO_STEP else args.step_size,
                              device=args.device, modality="other" if args.modality == AUTO_MODALITY else args.modality,
                              precision=args.precision)
    predictor.hidden_edge_factor = args.hidden_edge_factor
    predictor.initialize_from_model_folder(args.m, args.f, args.chk)
    held_out_file = args.held_out or os.path.join(model_folder, HELD_OUT_FILE)
    held_out = read_held_out(model_folder, args.held_out)
    for folder in folders:
        if not held_out.get(folder.name):
            raise IrisInputError(f"{held_out_file}: no held-out cases of {folder.name}")

    results = {f.name: run_dataset(args, predictor, f, held_out[f.name]) for f in folders}
    command = shlex.join(["python", *sys.argv])
    hardware = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"SimpleITK {sitk.Version.VersionString()}, {args.threads} threads, Iris on {args.device}")
    print(f"\n{command}\n{hardware}\nmodel {model_folder} fold {args.f} {args.chk}\n")
    print(markdown_table(results))
    for ds, r in results.items():
        print(f"\n{ds}: queries {', '.join(r['queries'])}; references {', '.join(r['references'])}")
        if r["registration_over_oneshot"] is not None:
            print(f"{ds}: registration s/query / iris oneshot s/query = {r['registration_over_oneshot']:.1f}x")
    settings = {k: v for k, v in vars(args).items()}
    write_json_atomic(json_ready({"command": command, "hardware": hardware, "model": model_folder,
                                  "settings": settings, "registration": {
                                      "sampling": SAMPLING, "max_samples": MAX_SAMPLES, "bspline_mesh": BSPLINE_MESH,
                                      "bspline_iterations": BSPLINE_ITERATIONS, "min_grid_voxels": MIN_GRID_VOXELS,
                                      "demons_iterations": args.demons_iterations,
                                      "demons_spacing_mm": DEMONS_SPACING_MM, "demons_smoothing": DEMONS_SMOOTHING,
                                      "fine_demons": registration.FINE_DEMONS,
                                      "fine_demons_voxels": FINE_DEMONS_VOXELS},
                                  "datasets": results}), args.output)
    print(f"\nall figures written to {args.output}")
    return 0


if __name__ == "__main__":
    main()
