"""Final validation of a fold, like nnU-Net's: whole validation cases, sliding window, exported to their original
geometry and scored against gt_segmentations with nnU-Net's evaluator. Iris's difference: every case is segmented
ONE-SHOT, conditioned on one reference from the member's training split (the training case that holds the most
of the member's classes, fixed for all its validation cases).

Writes fold_F/validation/{member}/{case}{ending} + summary.json (nnU-Net's format) and fold_F/validation/summary.json
(mean Dice per member).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from tqdm import tqdm

from iris_nnu.files import write_json_atomic
from iris_nnu.inference.export import indices_to_values
from iris_nnu.inference.images import write_segmentation
from iris_nnu.inference.predictor import IrisPredictor
from iris_nnu.inference.references import structure_crops


def choose_reference(dataset: nnUNetDatasetBlosc2, cases: list[str], labels: list[int]) -> str:
    """The training case whose class_locations hold the most of the member's labels (first by name on ties)."""
    def held(case: str) -> int:
        locations = load_pickle(os.path.join(dataset.source_folder, case + ".pkl"))["class_locations"]
        return sum(1 for c in labels if len(locations.get(c, [])) > 0)

    return max(sorted(cases), key=held)


def one_shot_validation(trainer) -> dict[str, float]:
    """Validate trainer's fold; returns {member: mean foreground Dice}."""
    network = trainer.iris_network
    predictor = IrisPredictor(tile_step_size=0.5, use_mirroring=True, device=trainer.device)
    predictor.initialize(network, trainer.plans_manager.plans, trainer.dataset_json,
                         trainer.inference_allowed_mirroring_axes)
    reader_writer = predictor.reader_writer_class()
    train_cases, val_cases = trainer.do_split()
    summary = {}
    for member in trainer.collection.members:
        if not val_cases[member.name] or not train_cases[member.name]:
            continue
        labels = member.foreground_labels
        ending = load_json(os.path.join(os.path.dirname(member.preprocessed_folder), "dataset.json"))["file_ending"]
        dataset = nnUNetDatasetBlosc2(member.preprocessed_folder,
                                      sorted(set(train_cases[member.name]) | set(val_cases[member.name])))
        reference = choose_reference(dataset, train_cases[member.name], labels)
        data, seg, _, _ = dataset.load_case(reference)
        # crops index the member's labels 1..K in order; background and outside-the-crop (-1) are 0
        indices = np.zeros(seg.shape[1:], dtype=np.int16)
        for i, label in enumerate(labels, start=1):
            indices[seg[0] == label] = i
        with torch.no_grad():
            present = [i for i in range(1, len(labels) + 1) if (indices == i).any()]
            task = predictor.encode_crops(structure_crops(np.asarray(data), indices, present, predictor.patch_size),
                                          [labels[i - 1] for i in present])
        output = os.path.join(trainer.output_folder, "validation", member.name)
        os.makedirs(output, exist_ok=True)
        for case in tqdm(val_cases[member.name], desc=f"validation {member.name}", unit="case",
                         disable=trainer.local_rank != 0):
            data, _, _, properties = dataset.load_case(case)
            index_map, _, _ = predictor.segment_preprocessed(np.asarray(data), properties, task)
            write_segmentation(indices_to_values(index_map, task.classes), os.path.join(output, case + ending),
                               properties, reader_writer)
        gt = os.path.join(os.path.dirname(member.preprocessed_folder), "gt_segmentations")
        metrics = compute_metrics_on_folder(gt, output, os.path.join(output, "summary.json"), reader_writer, ending,
                                            labels, None, num_processes=1, chill=True)
        summary[member.name] = float(metrics["foreground_mean"]["Dice"])
    write_json_atomic({"one_shot_mean_dice": summary,
                       "mean_over_members": float(np.mean(list(summary.values()))) if summary else None},
                      os.path.join(trainer.output_folder, "validation", "summary.json"))
    return summary
