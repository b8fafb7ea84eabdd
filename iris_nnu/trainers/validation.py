"""Final validation of a fold, like nnU-Net's: whole validation cases, sliding window, exported to their original
geometry and scored against gt_segmentations with nnU-Net's evaluator. Iris's difference: every case is segmented
ONE-SHOT, conditioned on one reference from the member's training split (the training case that holds the most
of the member's classes, fixed for all its validation cases).

Writes fold_F/validation/{member}/{case}{ending} + summary.json (nnU-Net's format) and fold_F/validation/summary.json
(mean Dice per member).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from tqdm import tqdm

from iris_nnu.files import write_json_atomic
from iris_nnu.inference.export import indices_to_values
from iris_nnu.inference.predictor import CaseResult, IrisPredictor
from iris_nnu.preprocessing.frames import body_frame
from iris_nnu.inference.references import ReferenceCase, reference_from_preprocessed
from iris_nnu.orientation import stored_properties, to_storage
from iris_nnu.preprocessing.planner import member_spacing


def choose_reference(dataset: nnUNetDatasetBlosc2, cases: list[str], labels: list[int]) -> str:
    """The training case whose class_locations hold the most of the member's labels (first by name on ties)."""
    def held(case: str) -> int:
        locations = load_pickle(os.path.join(dataset.source_folder, case + ".pkl"))["class_locations"]
        return sum(1 for c in labels if len(locations.get(c, [])) > 0)

    return max(sorted(cases), key=held)


def one_shot_validation(trainer, folder_name: str = "validation", max_cases: int | None = None,
                        classes_per_pass: int | None = None, save_probabilities: bool = False) -> dict[str, float]:
    """Validate trainer's fold; returns {member: mean foreground Dice}. With `save_probabilities` each case also gets
    {case}.npz (per-class probabilities, original geometry) and {case}.pkl, as nnU-Net's --npz.

    `max_cases` limits the validation cases per member (the first by name) and `classes_per_pass` splits the
    decoding into passes, for learning curves and the joint-vs-separate decoding check; results go to
    fold_F/`folder_name`."""
    with _inference_mode(trainer) as network:
        predictor = _predictor(trainer, network, classes_per_pass)
        reader_writer = predictor.reader_writer_class()
        summary = {}
        for member, dataset, task, cases in _member_tasks(trainer, predictor, max_cases):
            ending = load_json(os.path.join(os.path.dirname(member.preprocessed_folder), "dataset.json"))["file_ending"]
            output = os.path.join(trainer.output_folder, folder_name, member.name)
            os.makedirs(output, exist_ok=True)
            for case in tqdm(cases, desc=f"{folder_name} {member.name}", unit="case",
                             disable=trainer.local_rank != 0):
                data, seg, _, properties = dataset.load_case(case)
                segmented = predictor.segment_preprocessed(np.asarray(data), properties, task,
                                                           probabilities=save_probabilities,
                                                           frame=predictor.query_frame(np.asarray(data), body_frame(seg)))
                # in the case's own voxel order and header, as its ground truth (preprocessing may reorient)
                result = CaseResult(to_storage(indices_to_values(segmented.labels, task.classes), properties),
                                    stored_properties(properties), reader_writer, list(task.classes),
                                    to_storage(segmented.probabilities, properties))
                predictor.write_result(result, os.path.join(output, case), ending, save_probabilities)
            gt = os.path.join(os.path.dirname(member.preprocessed_folder), "gt_segmentations")
            written = (ending, ".npz", ".pkl") if save_probabilities else (ending,)
            for stale in set(os.listdir(output)) - {case + ext for case in cases for ext in written}:
                if stale.endswith((ending, ".npz", ".pkl")):  # an earlier run's
                    os.remove(os.path.join(output, stale))
            metrics = compute_metrics_on_folder(gt, output, os.path.join(output, "summary.json"), reader_writer,
                                                ending, member.foreground_labels, None, num_processes=1, chill=True)
            summary[member.name] = float(metrics["foreground_mean"]["Dice"])
    write_json_atomic({"one_shot_mean_dice": summary,
                       "mean_over_members": float(np.mean(list(summary.values()))) if summary else None},
                      os.path.join(trainer.output_folder, folder_name, "summary.json"))
    return summary


def reference_following(trainer, max_cases: int | None = None, max_classes: int = 4) -> dict[str, np.ndarray]:
    """Per member, Dice[asked, truth] over its first `max_classes` classes: the model asked for ONE class of the
    one-shot task at a time, scored against every class's ground truth (voxels pooled over the validation cases,
    preprocessed space). A model that reads its reference has a dominant diagonal; one that segments "any
    structure" has equal rows."""
    out = {}
    with _inference_mode(trainer) as network:
        predictor = _predictor(trainer, network, None)
        for member, dataset, task, cases in _member_tasks(trainer, predictor, max_cases):
            classes = task.classes[:max_classes]
            overlap, predicted, truth = (np.zeros((len(classes), len(classes))), np.zeros(len(classes)),
                                         np.zeros(len(classes)))
            for case in cases:
                data, seg, _, properties = dataset.load_case(case)
                frame = predictor.query_frame(np.asarray(data), body_frame(seg))  # once per case, not per class asked
                seg = np.asarray(seg)[0]
                masks = [seg == c for c in classes]
                truth += [m.sum() for m in masks]
                for i, asked in enumerate(classes):
                    labels = predictor.segment_preprocessed(np.asarray(data), properties, task.select([asked]),
                                                            export=False, preprocessed_labels=True,
                                                            frame=frame).preprocessed_labels
                    mask = labels > 0
                    predicted[i] += mask.sum()
                    overlap[i] += [(mask & m).sum() for m in masks]
            out[member.name] = 2 * overlap / np.maximum(predicted[:, None] + truth[None, :], 1)
    return out


@contextlib.contextmanager
def _inference_mode(trainer):
    """The trainer's network in eval mode without deep supervision, under no_grad; restored afterwards."""
    network = trainer.iris_network
    mode = network.training, network.deep_supervision
    network.eval()
    network.set_deep_supervision(False)
    try:
        with torch.no_grad():
            yield network
    finally:
        network.train(mode[0])
        network.set_deep_supervision(mode[1])


def _predictor(trainer, network, classes_per_pass: int | None) -> IrisPredictor:
    # no mirrored TTA: validation tracks the model, and TTA would cost 8 passes per window
    predictor = IrisPredictor(tile_step_size=0.5, use_mirroring=False, device=trainer.device,
                              classes_per_pass=classes_per_pass)
    predictor.initialize(network, trainer.plans_manager.plans, trainer.dataset_json,
                         trainer.inference_allowed_mirroring_axes)
    return predictor


def _member_tasks(trainer, predictor: IrisPredictor, max_cases: int | None):
    """Per member with validation cases: (member, its dataset, the one-shot task from its reference, the first
    `max_cases` validation cases by name)."""
    train_cases, val_cases = trainer.do_split()
    for member in trainer.collection.members:
        # a member of images only has nothing to validate against
        if not val_cases[member.name] or not train_cases[member.name] or not member.foreground_labels:
            continue
        labels = member.foreground_labels
        dataset = nnUNetDatasetBlosc2(member.preprocessed_folder,
                                      sorted(set(train_cases[member.name]) | set(val_cases[member.name])))
        reference = choose_reference(dataset, train_cases[member.name], labels)
        data, seg, _, _ = dataset.load_case(reference)
        # the member's labels as indices 1..K in order; background and outside-the-crop (-1) are 0
        indices = np.zeros(seg.shape[1:], dtype=np.int16)
        for i, label in enumerate(labels, start=1):
            indices[seg[0] == label] = i
        gt = os.path.join(os.path.dirname(member.preprocessed_folder), "gt_segmentations", reference)
        # the same preparation as inference's references (a reference may lack some of the member's classes)
        predictor.use_spacing(member_spacing(trainer.plans_manager.plans, member.name))
        prepared = reference_from_preprocessed(ReferenceCase(reference, [], gt), np.asarray(data), indices, labels,
                                               labels, body_frame(seg), predictor.patch_size, predictor.position_grid,
                                               predictor.configuration_manager.spacing)
        # queries meet the prior as iris_predict's do: registered to the reference (prior_alignment)
        predictor.alignment_anchors = [prepared.anchor] if prepared.anchor else []
        task = predictor.encode_crops(prepared.crops, prepared.values, prepared.positions)
        yield member, dataset, task, sorted(val_cases[member.name])[:max_cases]
