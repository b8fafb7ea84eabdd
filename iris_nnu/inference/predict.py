"""`iris_predict`: segment scans given reference image + label pairs (or a task file), each in its own geometry."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile

from tqdm import tqdm

from iris_nnu.cli import HelpFormatter
from iris_nnu.device import add_device_argument, resolve_device
from iris_nnu.errors import IrisInputError, cli_entry
from iris_nnu.files import remove_stale_partials
from iris_nnu.inference.dicom_output import check_dicom_queries
from iris_nnu.inference.images import Query, find_queries
from iris_nnu.inference.names import dataset_json_names, read_label_names
from iris_nnu.inference.outputs import OUTPUT_TYPES, query_output_files, resolve_output_types, write_query_outputs
from iris_nnu.inference.plans import AUTO_MODALITY, MODALITIES, trained_on_ct_only
from iris_nnu.inference.alignment import PRIOR_ALIGNMENTS
from iris_nnu.inference.predictor import DEFAULT_PRIOR_ALIGNMENT, IrisPredictor
from iris_nnu.inference.references import ReferenceCase, parse_reference
from iris_nnu.inference.runner import failure_line
from iris_nnu.inference.segmenter import DEFAULT_PRECISION, MIN_STEP_SIZE, PRECISIONS, window_precision
from iris_nnu.inference.strategies import (AUTO_FUSION, AUTO_POSTPROCESS, AUTO_STEP, AUTO_THRESHOLD, CROP_EXTENT_MM,
                                          DEFAULT_STEP_SIZE, DEFAULT_TUNE_LR, DEFAULT_TUNE_STEPS, DENSE_STEP_SIZE,
                                          FUSION_SETTINGS, POSTPROCESS_SETTINGS, REGISTRATION_WEIGHT, STEP_MARGIN,
                                          STRATEGIES, apply_fusion, check_fusion_source, hidden_edge_line,
                                          run_threshold, task_file_threshold, with_calibration)
from iris_nnu.io.model_folder import DEFAULT_CHECKPOINT, DEFAULT_MODEL_FOLDER, model_folder_folds
from iris_nnu.model.task import FORMAT_VERSION as TASK_FORMAT

PROGRAM = "iris_predict"
# -npp / -nps by device: on CPU the network already uses every core and background workers only compete with it
# (measured with benchmarks/worker_speed.py on 2 cores: 1.65x the time for 20 hippocampi, 1.01x for 3 brains); on a
# GPU the CPU is free while the network runs, and nnU-Net's default of 3 applies (not measured here)
DEFAULT_WORKERS = {"cpu": 0, "cuda": 3}
LISTED_EXISTING = 3  # existing outputs named in the refusal


def report(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    tqdm.write(f"{PROGRAM}: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Segment 3D scans with an Iris model given reference scans and their labels (or a task file "
                    "saved from them). Every non-zero label value of the references is a class; the output carries "
                    "the same values, in each query's own geometry. The task is encoded once per run.",
        formatter_class=HelpFormatter)
    p.add_argument("-i", metavar="INPUT", default=None,
                   help="query image file, folder of images (nnU-Net {case}_0000 naming or plain names; .nii.gz .nii "
                        ".mha .mhd .nrrd .nhdr .gipl) or DICOM series folder(s); required unless only --save_task")
    p.add_argument("-o", metavar="OUTPUT", default=None,
                   help="output folder (created if missing): one segmentation per query named by case (DICOM "
                        "queries: .nii.gz); existing outputs need --overwrite or --continue_prediction, and no output "
                        "may be an input or lie in a reference folder")
    p.add_argument("--output_type", nargs="+", choices=OUTPUT_TYPES, default=["nifti"], metavar="TYPE",
                   help="what each query's segmentation is written as: nifti ({case} in the query's format; DICOM "
                        "queries .nii.gz), dicom_seg ({case}_seg.dcm, a DICOM-SEG referencing the query's series, one "
                        "named segment per structure; highdicom), rtstruct ({case}_rtstruct.dcm, named contours per "
                        "structure referencing the series; rt-utils), both (= nifti dicom_seg). Types combine: "
                        "'--output_type both rtstruct' writes all three. dicom_seg and rtstruct need DICOM-series "
                        "queries")
    p.add_argument("--label_names", metavar="FILE",
                   help='JSON {"value": "name", ...} naming the structures in DICOM outputs, --statistics and a '
                        "--save_task file (default: the labels of the reference folders' dataset.json, or the names "
                        "the --task file keeps; else 'label V')")
    p.add_argument("--statistics", action="store_true",
                   help="also write {case}_statistics.json and .csv: per structure its label value, name, voxel "
                        "count, volume in ml (voxels x the query's voxel volume) and mean query intensity inside it")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("-r", nargs="+", metavar="REF",
                      help="references: IMAGE:LABEL pairs, or folders in nnU-Net raw layout (imagesTr/ + labelsTr/) "
                           "whose pairs are all used")
    task.add_argument("--task", metavar="FILE", help="segment with a task file written by --save_task (no reference "
                                                      "images needed)")
    p.add_argument("-m", metavar="MODEL_FOLDER", default=None,
                   help="iris_train model folder ($nnUNet_results/DatasetXXX_Name/IrisTrainer__IrisPlans__3d_fullres); "
                        "default: the model bundled with iris-nnu (iris_nnu/default_model, a CPU-trained demonstration "
                        "model over MR and CT: hippocampus, whole brains, head-and-neck CT, abdominal MR; see its "
                        "MODEL_CARD.md)")
    p.add_argument("-f", nargs="+", default=["0"], metavar="FOLD",
                   help="fold(s) of the model (fold_F folders); several, or 'all', make a fold ensemble: each fold "
                        "encodes the references and the per-class probabilities are the mean of the folds' (needs -r, "
                        "not --task / --save_task: a task file holds one fold's embedding)")
    p.add_argument("-chk", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT", help="checkpoint file in the fold folder")
    p.add_argument("--classes", nargs="+", type=int, metavar="L",
                   help="segment only these label values (default: every non-zero value of the references / task)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ensemble",
                   help="oneshot: one reference; ensemble: per class, average the embeddings of the references "
                        "holding it (one reference = one-shot); retrieval: per class, use the reference(s) most "
                        "similar to the query's own predicted structure; tune: optimise the task embedding on the "
                        "references, the network frozen (measured: 0 to +0.04 Dice on datasets the model never "
                        "trained on, nothing on those it did; 20 passes over the reference crops, seconds for a few "
                        "structures, minutes for 85; see the README's Results)")
    p.add_argument("--save_task", metavar="FILE",
                   help="write the encoded task (the references' embeddings; with tune, the tuned embedding) for "
                        "--task; a task file shares a segmentation task without sharing patients. An existing task "
                        "file is replaced only with --overwrite, any other existing file never")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", action="store_true",
                     help="mirrored test-time augmentation: each of the 8 flips of the query is segmented with the "
                          "task encoded from the references flipped the same way, and the logits are averaged "
                          "(measured: +0.01 Dice for 5.4-6.5x the time per query; see the README's Results)")
    tta.add_argument("--disable_tta", action="store_true", help="no test-time augmentation (the default; nnU-Net's flag)")
    p.add_argument("--threshold", default=AUTO_THRESHOLD, metavar="P|auto",
                   help="a voxel gets its most probable class where that probability exceeds P, else background (0.5: "
                        "nnU-Net's sigmoid rule). auto: with -r, one P per class (0.99 down to 0.01; above 0.5 only "
                        "where it gains 0.05) under which the task segments its own references best, at the cost of "
                        "segmenting each once (measured: whole brains 0.543 with one P for all, 0.564 with one per "
                        "class; the abdomen 0.744 with Ps above 0.5, 0.615 without; no member lower; see the "
                        "README); with --task, the P(s) the task file was calibrated at (0.5 if none). --save_task "
                        "records the run's P(s) in the task file (with --registration_fusion registration, the ones "
                        "calibrated for the network alone, as a task file segments)")
    p.add_argument("-step_size", default=AUTO_STEP, metavar="S|auto",
                   help=f"sliding-window step as a fraction of the patch ({MIN_STEP_SIZE} to 1; nnU-Net's 0.5). auto: "
                        f"with -r, {DENSE_STEP_SIZE} where the task segments its own references better under it than "
                        f"under {DEFAULT_STEP_SIZE} (by {STEP_MARGIN} Dice), else {DEFAULT_STEP_SIZE}, at the cost of "
                        f"segmenting each reference once more (measured on head-and-neck CT: 0.336 against 0.314 at "
                        f"0.5, chosen; brains and abdomen stay at {DEFAULT_STEP_SIZE}, as good as 0.5 with 14%% and 34%% "
                        f"fewer windows; see the README); a CT run takes {DENSE_STEP_SIZE} without asking them (its "
                        f"windows cover the body's box alone, the air around it left as background); with --task, "
                        f"the step the task file records "
                        f"({DEFAULT_STEP_SIZE} if none); with --registration_fusion registration, {DEFAULT_STEP_SIZE}. "
                        f"--save_task records the run's step")
    add_device_argument(p)
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write {case}.npz (probabilities: per-class sigmoid maps, float16, in the query's "
                        "geometry; classes: their label values) and {case}.pkl (nnU-Net's properties)")
    p.add_argument("--modality", choices=(AUTO_MODALITY, *MODALITIES), default=AUTO_MODALITY,
                   help="normalisation of queries and references: CT = nnU-Net's CT clipping and z-score with the "
                        "model's CT statistics (else the [-990, 500] HU window); other = per-image 2nd/98th "
                        "percentile clip and z-score (MR, PET, ...); auto = CT when the first reference (with "
                        "--task: the first query) holds air in Hounsfield units (at least 0.5%% of its voxels below "
                        "-500), else other (one line says which). A CT's windows and registration cover the box of "
                        "its body (its regions above -500 HU, specks left out) alone")
    p.add_argument("--tune_steps", type=int, default=DEFAULT_TUNE_STEPS, help="optimisation steps of --strategy tune")
    p.add_argument("--tune_lr", type=float, default=DEFAULT_TUNE_LR, help="Adam learning rate of --strategy tune")
    p.add_argument("--retrieval_top_k", type=int, default=1,
                   help="references kept per class by --strategy retrieval (averaged)")
    p.add_argument("--classes_per_pass", type=int, default=None,
                   help="classes decoded together in one forward pass per window; more classes go in several "
                        "passes (bounds memory). Default: as many as fit 1 GB of class maps (usually all)")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the queries into this many parts (by sorted name) and segment only part -part_id: "
                        "run one process per part, e.g. one per GPU (nnU-Net's option)")
    p.add_argument("-part_id", type=int, default=0, help="which part this process segments, 0 .. -num_parts - 1")
    p.add_argument("-npp", type=int, default=None, metavar="N",
                   help="background processes that read and preprocess the next queries while the network segments "
                        "one (nnU-Net's option); 0: in turn, in this process. Default: 3 on CUDA, 0 on CPU (where "
                        "the network uses every core and workers only slow it down)")
    p.add_argument("-nps", type=int, default=None, metavar="N",
                   help="background threads that write finished segmentations (compression, --save_probabilities) "
                        "while the next query is segmented (nnU-Net's option); 0: in turn. Default as -npp")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--continue_prediction", action="store_true",
                          help="skip queries whose output (and, with --save_probabilities, .npz) already exists: "
                               "resume an interrupted run (an output is written last and atomically, so one that "
                               "exists is complete)")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace existing outputs (segmentations, .npz/.pkl, the --save_task file); without "
                               "it or --continue_prediction an existing output is an error. An input (query, "
                               "reference image or label, --task file, any file of a reference folder) is never "
                               "overwritten")
    p.add_argument("--no_position_prior", action="store_true",
                   help="segment from the image alone, ignoring where in their scans the references hold each class "
                        "(use it when queries and references cover different extents: crops of other regions, CT of "
                        "another field of view; models trained with the prior lose accuracy without it)")
    p.add_argument("--prior_alignment", choices=PRIOR_ALIGNMENTS, default=DEFAULT_PRIOR_ALIGNMENT,
                   help="how each query meets the references' position priors: affine = the query registered to the "
                        "first -r reference (SimpleITK, affine, mutual information, about a second per query), starting "
                        "from and never worse-fitting than the frames' match; frames = the two scans' body frames "
                        "(centre, principal axes, spread) put onto each other. A --task file holds no reference image, "
                        "so it always uses frames (measured: affine is better on every member; see the README's "
                        "Results) (default: %(default)s)")
    p.add_argument("--registration_fusion", choices=FUSION_SETTINGS, nargs="?", const="on", default=AUTO_FUSION,
                   help="on: carry the -r references' labels onto the query by a deformable registration (SimpleITK: "
                        "affine and B-spline by mutual information, then demons on a 3 mm grid and a 1.5 mm one where "
                        "the scans are that fine; about 20-35 s per abdominal, brain or head-and-neck query and "
                        "reference on one thread, under a second for hippocampus crops) and "
                        "add their evidence to each class's "
                        f"logit ({REGISTRATION_WEIGHT:g} where the registered label covers a voxel, minus as much "
                        "where it does not; twice that for a structure whose edge the reference's image hides, "
                        "its intensities just outside as inside, such as the thalamus: one line names them), decided "
                        "at the network's --threshold: a confident network outvotes a "
                        "registration gone astray. Measured one-shot from one reference on held-out queries, against "
                        "the network alone: the abdomen 0.708 against 0.669 over six references, whole brains 0.641 "
                        "against 0.562 (ANTs SyN 0.561), their deep structures 0.764 against 0.632 (ANTs SyN 0.764), "
                        "head-and-neck CT 0.625 against 0.560 from one reference and "
                        "0.437 against 0.464 from another, the hippocampus 0.806 against 0.817 (see the README's "
                        "Results). registration: the "
                        "registered labels alone, decided at 0.5, the network not run on the queries. auto: with one "
                        f"-r reference, on, but off where that reference is a crop (shorter than {CROP_EXTENT_MM:.0f} "
                        "mm along an axis, as the hippocampus's); with two or more, the second is segmented from "
                        "the first each way (off, on, registration) before the run and the best kept for each class "
                        "(a line says which; costs about three queries' time, once; a query whose registration "
                        "correlates with it below 0.8 of the second reference's is segmented by the network alone, "
                        "with a warning). off: the network alone (faster by the registration). A --task file holds no "
                        "image: fusion needs -r (auto is off). A bare --registration_fusion means on (default: "
                        "%(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="how the network computes the windows on a CPU: auto = bfloat16 on a CPU with AMX tiles "
                        "(Intel Xeon 4th generation and later: 13-18%% less time per window, Dice within 0.002 of "
                        "float32 on the four members; see the README's Results), float32 elsewhere. CUDA always uses "
                        "float16 autocast, as nnU-Net does, and MPS float32 (default: %(default)s)")
    p.add_argument("--postprocess", choices=POSTPROCESS_SETTINGS, default=AUTO_POSTPROCESS,
                   help="auto: keep only the largest connected component of the classes whose references, segmented "
                        "as the queries are, score better so (nnU-Net's rule, decided there on cross-validation; the "
                        "abdominal kidneys gain, a structure in pieces does not; a task file records the choice; none "
                        "for the classes a run fuses with registration); largest_component: of every class (the "
                        "authors' later code does); none: keep every component. --save_probabilities maps stay as "
                        "predicted (default: %(default)s)")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    if (args.i is None) != (args.o is None):
        raise IrisInputError("-i INPUT and -o OUTPUT go together")
    if args.i is None and not args.save_task:
        raise IrisInputError("nothing to do: give -i INPUT -o OUTPUT, or --save_task FILE to only encode the task")
    if args.o is not None and os.path.exists(args.o) and not os.path.isdir(args.o):
        raise IrisInputError(f"{args.o}: OUTPUT exists and is not a folder")
    if args.threshold != AUTO_THRESHOLD:
        try:
            threshold = float(args.threshold)
        except ValueError:
            threshold = -1.0
        if not 0 < threshold < 1:
            raise IrisInputError(f"--threshold {args.threshold}: give a probability between 0 and 1, or auto")
        args.threshold = threshold
    if args.step_size != AUTO_STEP:
        try:
            step = float(args.step_size)
        except ValueError:
            step = -1.0
        if not MIN_STEP_SIZE <= step <= 1:
            raise IrisInputError(f"-step_size must be in [{MIN_STEP_SIZE}, 1] or auto, got {args.step_size}")
        args.step_size = step
    if args.classes and min(args.classes) <= 0:
        raise IrisInputError(f"--classes: label values are positive (0 is background), got {min(args.classes)}")
    if args.tune_steps < 0 or args.tune_lr <= 0:
        raise IrisInputError(f"--tune_steps must be >= 0 and --tune_lr > 0, got {args.tune_steps}, {args.tune_lr}")
    if args.retrieval_top_k < 1:
        raise IrisInputError(f"--retrieval_top_k must be at least 1, got {args.retrieval_top_k}")
    if args.classes_per_pass is not None and args.classes_per_pass < 1:
        raise IrisInputError(f"--classes_per_pass must be at least 1, got {args.classes_per_pass}")
    check_fusion_source(args.registration_fusion, bool(args.task))
    if args.tta and args.strategy == "tune":
        raise IrisInputError("--tta with --strategy tune: the tuned embedding is of the unflipped references only")
    if args.strategy == "tune" and args.task:
        raise IrisInputError("--strategy tune optimises the task on the reference images: give them with -r "
                             "(a task file holds no images)")
    if (args.npp or 0) < 0 or (args.nps or 0) < 0:
        raise IrisInputError(f"-npp and -nps must be >= 0, got {args.npp}, {args.nps}")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise IrisInputError(f"-part_id must be in 0 .. -num_parts - 1 and -num_parts >= 1, got -part_id "
                             f"{args.part_id}, -num_parts {args.num_parts}")
    if args.i is not None:
        check_dicom_queries(args.i, resolve_output_types(args.output_type))
    if args.label_names:
        read_label_names(args.label_names)
    if args.save_task:
        folder = os.path.dirname(os.path.abspath(args.save_task))
        if not os.path.isdir(folder):
            raise IrisInputError(f"--save_task {args.save_task}: folder {folder} does not exist")
        if os.path.isdir(args.save_task):
            raise IrisInputError(f"--save_task {args.save_task}: a folder; give the task file's name, e.g. "
                                 f"{os.path.join(args.save_task, 'task.pt')}")
        if os.path.exists(args.save_task):
            if not is_task_file(args.save_task):
                raise IrisInputError(f"--save_task {args.save_task}: exists and is not a task file; it is never "
                                     f"replaced (choose another name)")
            if not args.overwrite:
                raise IrisInputError(f"--save_task {args.save_task}: the task file exists (--overwrite replaces it)")
        check_writable(folder, f"--save_task {args.save_task}")


def is_task_file(path: str) -> bool:
    """Whether `path` is a task file written by --save_task (loaded as TaskEmbedding.load does: no code runs)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not a task file
        return False
    return isinstance(state, dict) and state.get("format") == TASK_FORMAT


def check_writable(folder: str, what: str) -> None:
    """A file can be created in `folder` (a probe, removed at once): a run never fails at its first write."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".iris_write_test_"):
            pass
    except OSError as e:
        raise IrisInputError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def prepare_output_folder(path: str) -> bool:
    """Create -o if needed and check that files can be written there; returns whether it was created."""
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise IrisInputError(f"-o {path}: cannot create the output folder ({e.strerror or e})") from None
    check_writable(path, f"-o {path}")
    return created


def output_files(query: Query, output_folder: str, args: argparse.Namespace) -> list[str]:
    target = os.path.join(output_folder, query.name)
    return query_output_files(query, output_folder, resolve_output_types(args.output_type), args.statistics) + \
        ([target + ".npz", target + ".pkl"] if args.save_probabilities else [])


def check_outputs(args: argparse.Namespace, queries: list[Query], pending: list[Query],
                  references: list[ReferenceCase], reference_folders: list[str]) -> None:
    """No output may be an input or lie in a reference folder; existing outputs of the `pending` queries (those
    --continue_prediction did not skip) only with --overwrite or --continue_prediction (which resumes them). One
    line, before anything is encoded or written."""
    inputs = {}
    for query in queries:
        inputs.update({os.path.realpath(p): "a query" for p in query.images})
    for case in references:
        inputs.update({os.path.realpath(p): "a reference image" for p in case.images})
        inputs[os.path.realpath(case.label)] = "a reference label"
    if args.task:
        inputs[os.path.realpath(args.task)] = "the --task file"
    folders = [os.path.realpath(f) for f in reference_folders]
    outputs = [f for q in queries for f in output_files(q, args.o, args)] if args.o else []
    series = [os.path.realpath(q.images[0]) for q in queries if os.path.isdir(q.images[0])]
    for path in outputs + ([args.save_task] if args.save_task else []):
        real = os.path.realpath(path)
        if real in inputs:
            raise IrisInputError(f"{real}: its output would overwrite it ({inputs[real]}); choose another "
                                 f"{'--save_task file' if path == args.save_task else 'OUTPUT folder'}")
        inside = next((f for f in folders if os.path.commonpath([f, real]) == f), None)
        if inside:
            raise IrisInputError(f"{path}: an output inside reference folder {inside}, whose files are inputs; "
                                 f"choose another {'--save_task file' if path == args.save_task else 'OUTPUT folder'}")
        in_series = next((f for f in series if os.path.dirname(real) == f), None)
        if in_series and path.endswith(".dcm"):
            raise IrisInputError(f"{path}: a DICOM output inside query series folder {in_series} (the folder would "
                                 f"then hold two series); choose another OUTPUT folder")
    pending_outputs = [f for q in pending for f in output_files(q, args.o, args)] if args.o else []
    existing = [p for p in pending_outputs if os.path.lexists(p)]
    if existing and not (args.overwrite or args.continue_prediction):
        names = ", ".join(os.path.basename(p) for p in existing[:LISTED_EXISTING])
        more = f" and {len(existing) - LISTED_EXISTING} more" if len(existing) > LISTED_EXISTING else ""
        raise IrisInputError(f"-o {args.o}: {len(existing)} output file(s) exist: {names}{more}; --overwrite "
                             f"replaces them, --continue_prediction skips finished queries")


def resolve_folds(folds: list[str], model_folder: str | None) -> list[str]:
    """-f as fold names: 'all' is every fold_F folder of the model."""
    if folds != ["all"]:
        if "all" in folds:
            raise IrisInputError(f"-f {' '.join(folds)}: 'all' stands alone")
        return folds
    folder = model_folder or DEFAULT_MODEL_FOLDER
    found = model_folder_folds(folder) if os.path.isdir(folder) else []
    if not found:
        raise IrisInputError(f"{folder}: -f all, but the model folder has no fold_F folders")
    return found


def finished(query: Query, output_folder: str, args: argparse.Namespace) -> bool:
    """Whether the query's outputs exist (each is written atomically, the segmentation's after the .npz)."""
    return all(os.path.isfile(f) for f in output_files(query, output_folder, args) if not f.endswith(".pkl"))


@cli_entry(PROGRAM)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    created = prepare_output_folder(args.o) if args.o else False
    removed = remove_stale_partials(args.o) if args.o else []
    if removed:
        print(f"{PROGRAM}: removed {len(removed)} partial file(s) a killed run left in {args.o}: "
              f"{', '.join(removed[:LISTED_EXISTING])}{' ...' if len(removed) > LISTED_EXISTING else ''}")
    try:
        return run_prediction(args)
    except BaseException:
        if created and os.path.isdir(args.o) and not os.listdir(args.o):
            os.rmdir(args.o)  # a run that failed before writing anything leaves no empty folder behind
        raise


def run_prediction(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    workers = DEFAULT_WORKERS.get(device.type, 0)
    npp, nps = (workers if args.npp is None else args.npp), (workers if args.nps is None else args.nps)
    predictor = IrisPredictor(tile_step_size=DEFAULT_STEP_SIZE if args.step_size == AUTO_STEP else args.step_size,
                              use_mirroring=args.tta,
                              device=device, modality="other" if args.modality == AUTO_MODALITY else args.modality,
                              classes_per_pass=args.classes_per_pass,
                              largest_component=args.postprocess == "largest_component",
                              position_prior=not args.no_position_prior, prior_alignment=args.prior_alignment,
                              precision=args.precision)
    predictor.initialize_from_model_folder(args.m, resolve_folds(args.f, args.m), args.chk)
    if predictor.num_folds > 1 and args.save_task:  # --task: load_task says the same
        raise IrisInputError(f"--save_task {args.save_task}: a task file holds one fold's embedding; a fold ensemble "
                             f"(-f {' '.join(predictor.folds)}) encodes the references with each fold (-r)")
    if args.tta and not predictor.mirror_flips:
        report("warning: the model was trained without mirroring (no mirror axes in its checkpoint): --tta ignored")
    if args.modality == "other" and trained_on_ct_only(predictor.joint_plans):
        report("warning: the model was trained on CT only; pass --modality CT for CT scans")
    if args.precision == "auto" and window_precision(args.precision, device) == "bfloat16":
        print(f"{PROGRAM}: windows in bfloat16 (this CPU multiplies it in hardware; --precision float32 to compare)")
    queries, problems = find_queries(args.i, predictor.num_channels) if args.i else ([], [])
    queries = sorted(queries, key=lambda q: q.name)[args.part_id::args.num_parts]
    pending = queries
    if args.continue_prediction:
        pending = [q for q in queries if not finished(q, args.o, args)]
    cases = [case for spec in args.r or [] for case in parse_reference(spec, predictor.num_channels)]
    check_outputs(args, queries, pending, cases, [spec for spec in args.r or [] if os.path.isdir(spec)])
    if len(pending) < len(queries):
        print(f"{PROGRAM}: {len(queries) - len(pending)} queries already segmented in {args.o}, skipped "
              f"(--continue_prediction)")
    queries = pending
    if args.modality == AUTO_MODALITY:
        images = cases[0].images if cases else queries[0].images if queries else None
        if images:
            modality, line = predictor.detect_modality(images)
            predictor.use_modality(modality)
            print(f"{PROGRAM}: {line}")

    references = None
    if args.r:
        fusion = args.registration_fusion if args.i else "off"  # only --save_task: no query to fuse
        if fusion == AUTO_FUSION and len(cases) > 1:
            print(f"{PROGRAM}: measuring registration fusion on the references (--registration_fusion auto): "
                  f"{cases[1].name} segmented from {cases[0].name} by the network, fused, and by the registration")
        line = apply_fusion(predictor, fusion, cases, args.classes)
        if line:
            print(f"{PROGRAM}: {line}")
        references = predictor.encode_references(cases, args.classes)
        for label, values in references.lost.items():
            report(f"warning: {label}: label value(s) {' '.join(map(str, values))} vanish at the model's spacing")
        pool = references.pool
        folds = f" by each of {predictor.num_folds} folds" if predictor.num_folds > 1 else ""
        print(f"{PROGRAM}: task encoded from {len(references.names)} reference(s){folds}, classes "
              f"{' '.join(map(str, references.classes))}")
        line = hidden_edge_line(predictor, references.classes)
        if line:
            print(f"{PROGRAM}: {line}")
    else:
        pool = predictor.load_task(args.task, args.classes)
        if args.prior_alignment == "affine" and predictor.position_prior and predictor.position_grid:
            print(f"{PROGRAM}: the position prior is read through the scans' frames: a task file holds no reference "
                  f"image to register the queries to (give -r for --prior_alignment affine)")
        if predictor.mirror_flips and not pool.mirrored:
            raise IrisInputError(f"{args.task}: the task file holds no mirrored embeddings for --tta; encode it with "
                                 f"-r ... --tta --save_task, or segment without --tta")
    task, losses = predictor.task_for_strategy(pool, args.strategy, references, args.tune_steps, args.tune_lr)
    if losses:
        print(f"{PROGRAM}: tuned the task embedding for {args.tune_steps} steps: reference loss "
              f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    predictor.decision_threshold, line = run_threshold(predictor, args.threshold, task, cases, args.step_size,
                                                       args.postprocess)
    if line:
        print(f"{PROGRAM}: {line}")
    names = structure_names(args, pool)
    if args.save_task:
        threshold, line = task_file_threshold(predictor, args.threshold, task, cases)
        if line:
            print(f"{PROGRAM}: {line}")
        saved = with_calibration(task if args.strategy == "tune" else pool, threshold, predictor.tile_step_size,
                                 predictor.largest_component)
        dataclasses.replace(saved, names=names or None).save(args.save_task)
        print(f"{PROGRAM}: task written to {args.save_task}")
    if args.i is None:
        return 0

    types = resolve_output_types(args.output_type)
    # without nifti the segmentations are written to a temporary folder, the DICOM outputs made from them
    segmentations = args.o if "nifti" in types else tempfile.mkdtemp(prefix="iris_predict_")
    try:
        failures = problems + predictor.predict_queries(
            queries, segmentations, task, pool if args.strategy == "retrieval" else None, args.retrieval_top_k,
            args.save_probabilities, progress=True, report=report,
            reference_names=references.names if references else None,
            preprocessing_workers=npp if len(queries) > 1 else 0, export_workers=nps)
        if types != ("nifti",) or args.statistics:
            model_id = "+".join(dict.fromkeys(t.model_id for t in predictor.per_fold(task)))
            source = f"from {len(references.names)} reference(s)" if references else \
                f"from task file {os.path.basename(args.task)}"
            for query in queries:
                segmentation = os.path.join(segmentations, query.name + query.output_ending)
                if not os.path.isfile(segmentation):
                    continue  # failed, reported
                try:
                    write_query_outputs(query, segmentation, args.o, types, args.statistics,
                                        predictor.per_fold(task)[0].classes, names, model_id, source,
                                        predictor.reader_writer_class)
                except Exception as e:  # noqa: BLE001 - as a failed query: the others still get theirs
                    failures.append(failure_line(query, e))
    finally:
        if segmentations != args.o:
            shutil.rmtree(segmentations, ignore_errors=True)
    total = len(queries) + len(problems)
    print(f"{PROGRAM}: {total - len(failures)} of {total} queries segmented into {args.o}")
    if failures:
        raise IrisInputError(f"{len(failures)} of {total} queries failed: {'; '.join(failures)}")
    return 0


def structure_names(args: argparse.Namespace, pool) -> dict[int, str]:
    """{value: name}: the reference folders' dataset.json labels (the first folder's name wins) or the task file's,
    updated by --label_names."""
    names = {}
    for spec in reversed(args.r or []):
        if os.path.isdir(spec):
            names.update(dataset_json_names(spec))
    if args.task:
        names.update(pool.names or {})
    if args.label_names:
        names.update(read_label_names(args.label_names))
    return names


if __name__ == "__main__":
    main()
