"""The decision threshold calibrated on the references (iris_predict --threshold auto)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from conftest import cli_error

from iris_nnu.inference import IrisPredictor, parse_reference
from iris_nnu.inference.predict import main
from iris_nnu.inference.strategies import calibrated_threshold
from iris_nnu.model import TaskEmbedding

DEMO = Path(__file__).resolve().parents[1] / "iris_nnu" / "demo_data" / "Dataset001_Hippocampus"
REFERENCE = f"{DEMO}/imagesTr/hippocampus_004_0000.nii.gz:{DEMO}/labelsTr/hippocampus_004.nii.gz"
QUERY = str(DEMO / "imagesTr" / "hippocampus_026_0000.nii.gz")


def _dice(segmentation: np.ndarray) -> float:
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "labelsTr" / "hippocampus_026.nii.gz")))
    return float(np.mean([2 * np.sum((segmentation == c) & (truth == c)) / (np.sum(segmentation == c)
                                                                               + np.sum(truth == c)) for c in (1, 2)]))


def test_a_calibrated_threshold_recovers_a_model_unsure_of_its_classes():
    """The bundled model with its logits shifted down (probabilities run low, the ranking of classes unchanged, as
    for brains after training on CT): its references show the level, and the query gains from it."""
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    references = parse_reference(REFERENCE, 1)
    task = predictor.encode_references(references).pool.mean()
    threshold, dice = calibrated_threshold(predictor, references, task)
    assert dice[threshold] > 0.8 and dice[threshold] < dice[0.5] + 0.02  # calibrated as it is: little to gain
    with torch.no_grad():
        predictor.network.logit_bias -= 8.0
    task = predictor.encode_references(references).pool.mean()
    at_half = _dice(predictor.predict_case([QUERY], task).segmentation)
    threshold, dice = calibrated_threshold(predictor, references, task)
    assert threshold <= 0.15 and dice[threshold] > dice[0.5] + 0.05
    predictor.decision_threshold = threshold
    assert _dice(predictor.predict_case([QUERY], task).segmentation) > at_half + 0.05


def test_threshold_option(tmp_path, capsys):
    """auto is the default: calibrated on the -r references; a saved task records the run's threshold, which a
    --task run then segments at; a given P overrides it."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "hippocampus_026_0000.nii.gz").symlink_to(QUERY)
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "out"), "-r", REFERENCE]) == 0
    assert "decision threshold" in capsys.readouterr().out and (tmp_path / "out" / "hippocampus_026.nii.gz").is_file()
    line = cli_error(capsys, main, "iris_predict", ["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o2"), "-r",
                                                    REFERENCE, "--threshold", "1.5"])
    assert "--threshold 1.5" in line
    # a low threshold, recorded in the task file, segments more voxels than 0.5
    task = tmp_path / "task.pt"
    assert main(["-r", REFERENCE, "--save_task", str(task), "--threshold", "0.05"]) == 0
    assert TaskEmbedding.load(task).decision_threshold == 0.05
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o3"), "--task", str(task)]) == 0
    assert "decision threshold 0.05, as the task file was calibrated" in capsys.readouterr().out
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o4"), "-r", REFERENCE, "--threshold", "0.05",
                 "--prior_alignment", "frames"]) == 0  # a task file holds no image to register to
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o5"), "--task", str(task), "--threshold",
                 "0.5"]) == 0
    out = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "hippocampus_026.nii.gz")))
           for name in ("o3", "o4", "o5")}
    assert np.array_equal(out["o3"], out["o4"])
    assert (out["o3"] > 0).sum() > (out["o5"] > 0).sum()
