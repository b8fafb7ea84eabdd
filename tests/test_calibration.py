"""The decision threshold and the window step calibrated on the references (iris_predict --threshold auto,
-step_size auto)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from conftest import cli_error

from iris_nnu.inference import IrisPredictor, parse_reference
from iris_nnu.inference.predict import main
from iris_nnu.inference import predictor as predictor_module, segmenter, strategies
from iris_nnu.inference.strategies import (AUTO_STEP, AUTO_THRESHOLD, CALIBRATION_THRESHOLDS, DEFAULT_STEP_SIZE,
                                          DENSE_STEP_SIZE, RAISE_MARGIN, STEP_MARGIN, ThresholdCalibration,
                                          best_threshold, calibrated_threshold, calibrated_window, run_threshold,
                                          set_fusion)
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
    calibration = calibrated_threshold(predictor, references, task, per_class=False)
    threshold, dice = calibration.threshold, calibration.dice
    assert dice[threshold] > 0.8 and dice[threshold] < dice[0.5] + 0.02  # calibrated as it is: little to gain
    with torch.no_grad():
        predictor.network.logit_bias -= 8.0
    task = predictor.encode_references(references).pool.mean()
    at_half = _dice(predictor.predict_case([QUERY], task).segmentation)
    calibration = calibrated_threshold(predictor, references, task, per_class=False)
    threshold, dice = calibration.threshold, calibration.dice
    assert threshold <= 0.15 and dice[threshold] > dice[0.5] + 0.05
    predictor.decision_threshold = threshold
    assert _dice(predictor.predict_case([QUERY], task).segmentation) > at_half + 0.05


def test_each_class_gets_its_own_threshold(monkeypatch):
    """A model unsure of one class only (the posterior hippocampus's logits shifted down by 4.5, the anterior's left as
    they are, as for the thalamus beside the cortex on whole brains): one threshold for both is a compromise; one per
    class recovers each, on the references and on the query."""
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    network = predictor.network
    forward = network.forward

    def unsure_of_class_2(query, task, *args, **kwargs):
        logits = forward(query, task, *args, **kwargs)
        if 2 in task.classes:
            logits[:, task.classes.index(2)] -= 4.5  # its 0.5 at 0.011
        return logits
    monkeypatch.setattr(network, "forward", unsure_of_class_2)
    references = parse_reference(REFERENCE, 1)
    task = predictor.encode_references(references).pool.mean()
    single = calibrated_threshold(predictor, references, task, per_class=False)
    calibration = calibrated_threshold(predictor, references, task)
    assert calibration.dice == single.dice and calibration.single == single.threshold
    assert calibration.threshold[2] <= 0.02 < 0.3 <= calibration.threshold[1], calibration.threshold
    assert calibration.own > single.own + 0.01  # measured 0.838 against 0.823
    predictor.decision_threshold = single.threshold
    at_single = _dice(predictor.predict_case([QUERY], task).segmentation)
    predictor.decision_threshold = calibration.threshold
    assert _dice(predictor.predict_case([QUERY], task).segmentation) > at_single + 0.01  # 0.862 against 0.840
    threshold, line = run_threshold(predictor, AUTO_THRESHOLD, task, references)
    assert threshold == calibration.threshold and "decision threshold per class" in line, line


def test_a_threshold_above_one_half_needs_a_margin_one_below_does_not():
    near, far = RAISE_MARGIN / 2, RAISE_MARGIN * 2
    assert best_threshold({0.9: 0.7 + near, 0.5: 0.7, 0.3: 0.6}) == 0.5
    assert best_threshold({0.9: 0.7 + far, 0.5: 0.7, 0.3: 0.6}) == 0.9
    assert best_threshold({0.9: 0.6, 0.5: 0.7, 0.3: 0.7 + near / 10}) == 0.3
    assert best_threshold({0.5: 0.7, 0.4: 0.7}) == 0.5  # a tie: the higher
    assert best_threshold({0.9: 0.7}) == 0.9  # nothing at or below 0.5 to compare with


def test_a_model_that_spreads_its_classes_gets_thresholds_above_one_half():
    """The other way (abdominal kidneys: twice their volume at 0.5): the bundled model with its logits shifted up
    (every class spread beyond its edges at 0.5); its references choose thresholds above 0.5 and the query gains."""
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    with torch.no_grad():
        predictor.network.logit_bias += 6.0
    references = parse_reference(REFERENCE, 1)
    task = predictor.encode_references(references).pool.mean()
    calibration = calibrated_threshold(predictor, references, task)
    assert max(calibration.threshold.values()) >= 0.9, calibration.threshold  # measured {1: 0.99, 2: 0.5}
    predictor.decision_threshold = 0.5
    at_half = _dice(predictor.predict_case([QUERY], task).segmentation)
    predictor.decision_threshold = calibration.threshold
    calibrated = _dice(predictor.predict_case([QUERY], task).segmentation)
    assert calibrated > at_half + 0.03, (calibrated, at_half)  # measured 0.855 against 0.814


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
    # calibrated: one threshold per class, recorded in the task file and used by a run from it
    task = tmp_path / "calibrated.pt"
    assert main(["-r", REFERENCE, "--save_task", str(task)]) == 0
    recorded = TaskEmbedding.load(task).decision_threshold
    assert isinstance(recorded, dict) and sorted(recorded) == [1, 2], recorded
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o1"), "--task", str(task)]) == 0
    assert ", as the task file was calibrated" in capsys.readouterr().out
    # a low threshold, recorded in the task file, segments more voxels than 0.5
    task = tmp_path / "task.pt"
    assert main(["-r", REFERENCE, "--save_task", str(task), "--threshold", "0.05"]) == 0
    assert TaskEmbedding.load(task).decision_threshold == 0.05
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o3"), "--task", str(task)]) == 0
    assert "decision threshold 0.05, as the task file was calibrated" in capsys.readouterr().out
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o4"), "-r", REFERENCE, "--threshold", "0.05",
                 "--prior_alignment", "frames", "--registration_fusion", "off"]) == 0  # a task file holds no image
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o5"), "--task", str(task), "--threshold",
                 "0.5"]) == 0
    out = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "hippocampus_026.nii.gz")))
           for name in ("o3", "o4", "o5")}
    assert np.array_equal(out["o3"], out["o4"])
    assert (out["o3"] > 0).sum() > (out["o5"] > 0).sum()


def _calibration_by_step(gains: dict[float, float]):
    """A stand-in for calibrated_threshold whose references score best at 0.2, higher by gains[step] (else 0)."""
    def calibrated(predictor, references, task, thresholds=CALIBRATION_THRESHOLDS, scans=None, per_class=True):
        table = {t: 0.5 + gains.get(predictor.tile_step_size, 0.0) - abs(t - 0.2) for t in thresholds}
        return ThresholdCalibration(best_threshold(table), table, max(table.values()))
    return calibrated


def test_the_window_step_is_chosen_on_the_references(monkeypatch):
    """The denser step where the references gain at least STEP_MARGIN under it, else 0.5; the predictor's step is
    left as it was, and run_threshold sets the chosen one (none without references, or by the registration alone)."""
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    references = parse_reference(REFERENCE, 1)
    task = predictor.encode_references(references).pool.mean()
    window = calibrated_window(predictor, references, task)
    # the hippocampus crop (24 x 33 x 23 voxels at 1.5 mm) holds the same two 32^3 windows at either step: no gain
    assert window.dice[DEFAULT_STEP_SIZE] == window.dice[DENSE_STEP_SIZE] and window.step == DEFAULT_STEP_SIZE
    assert window.calibrations[DEFAULT_STEP_SIZE].own > 0.8 and predictor.tile_step_size == DEFAULT_STEP_SIZE

    predictor.tile_step_size = 0.7
    monkeypatch.setattr(strategies, "calibrated_threshold", _calibration_by_step({0.5: 0.0, DENSE_STEP_SIZE: 0.03}))
    window = calibrated_window(predictor, references, task)
    assert (window.step, window.threshold, predictor.tile_step_size) == (DENSE_STEP_SIZE, 0.2, 0.7)
    threshold, line = run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP)
    assert (threshold, predictor.tile_step_size) == (0.2, DENSE_STEP_SIZE)
    assert line.startswith(f"window step {DENSE_STEP_SIZE} and decision threshold 0.2 from the references"), line
    threshold, line = run_threshold(predictor, 0.4, task, references, AUTO_STEP)  # a given threshold is kept
    assert (threshold, predictor.tile_step_size) == (0.4, DENSE_STEP_SIZE) and "at decision threshold 0.4" in line

    monkeypatch.setattr(strategies, "calibrated_threshold",
                        _calibration_by_step({0.5: 0.0, DENSE_STEP_SIZE: STEP_MARGIN / 2}))
    assert run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP)[0] == 0.2
    assert predictor.tile_step_size == DEFAULT_STEP_SIZE  # half the margin: not worth the time
    predictor.tile_step_size = 0.7
    assert run_threshold(predictor, AUTO_THRESHOLD, task, None, AUTO_STEP)[1] is None  # a task file
    assert predictor.tile_step_size == DEFAULT_STEP_SIZE
    predictor.use_modality("CT")  # the windows over a CT's body: dense, the references segmented at that step alone
    steps = []
    monkeypatch.setattr(strategies, "calibrated_threshold", lambda predictor, *args, **kwargs: (
        steps.append(predictor.tile_step_size) or _calibration_by_step({})(predictor, *args, **kwargs)))
    threshold, line = run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP)
    assert (threshold, predictor.tile_step_size, steps) == (0.2, DENSE_STEP_SIZE, [DENSE_STEP_SIZE])
    assert line.startswith(f"window step {DENSE_STEP_SIZE} (CT: the windows over the body, dense) and decision "
                           f"threshold 0.2 from the references ("), line
    predictor.use_modality("other")
    predictor.tile_step_size = 0.7
    set_fusion(predictor, "registration")  # a reference registered onto itself says nothing
    assert run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP)[0] == 0.5
    assert predictor.tile_step_size == DEFAULT_STEP_SIZE
    set_fusion(predictor, "on")  # fused: decided at the network's threshold, calibrated as the network alone
    assert run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP)[0] == 0.2


def test_step_size_option(tmp_path, capsys, monkeypatch):
    """-step_size auto (the default) segments the queries at the step chosen on the references and says so, and a
    task file records it; a given step is used as given; anything else is refused."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "hippocampus_026_0000.nii.gz").symlink_to(QUERY)
    steps = []
    window_logits = segmenter.sliding_window_logits
    monkeypatch.setattr(segmenter, "sliding_window_logits",
                        lambda image, k, patch, step, *args, **kwargs: steps.append(step) or
                        window_logits(image, k, patch, step, *args, **kwargs))
    monkeypatch.setattr(strategies, "calibrated_threshold", _calibration_by_step({0.5: 0.0, DENSE_STEP_SIZE: 0.1}))
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "out"), "-r", REFERENCE]) == 0
    assert f"window step {DENSE_STEP_SIZE} and decision threshold 0.2" in capsys.readouterr().out
    assert steps[-1] == DENSE_STEP_SIZE and (tmp_path / "out" / "hippocampus_026.nii.gz").is_file()
    # a task file records the step chosen, and a run from it segments at that step
    task = tmp_path / "task.pt"
    assert main(["-r", REFERENCE, "--save_task", str(task)]) == 0 and TaskEmbedding.load(task).window_step == 0.33
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o1"), "--task", str(task)]) == 0
    assert f"window step {DENSE_STEP_SIZE}, as the task file was calibrated" in capsys.readouterr().out
    assert steps[-1] == DENSE_STEP_SIZE
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o2"), "-r", REFERENCE, "-step_size", "0.7"]) == 0
    assert "window step" not in capsys.readouterr().out and steps[-1] == 0.7
    line = cli_error(capsys, main, "iris_predict", ["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o3"), "-r",
                                                    REFERENCE, "-step_size", "dense"])
    assert "-step_size must be in" in line and "dense" in line


def test_the_largest_component_is_kept_where_the_references_gain():
    """nnU-Net's rule on the references: a class segmented with a stray island gains from its largest component
    alone; one whose label comes in two pieces, segmented whole, loses; one in one piece neither gains nor loses."""
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    truth[12:16, 2:6, 2:6] = 2  # class 2 in two pieces
    truth[12:16, 12:16, 2:6] = 2
    truth[2:6, 12:18, 12:18] = 3
    values = truth.copy()
    values[14:17, 14:17, 14:17] = 1  # a stray island of class 1
    scores = np.full(truth.shape, 5.0, dtype=np.float32)  # every class well above the threshold
    assert strategies.components_that_help([(values, scores, truth)], 0.5, [1, 2, 3]) == (1,)
    scores[14:17, 14:17, 14:17] = -1.0  # the island below the threshold: nothing to remove
    assert strategies.components_that_help([(values, scores, truth)], 0.5, [1, 2, 3]) == ()
    # per class thresholds: class 1's at 0.2 (logit -1.39) keeps the island again
    assert strategies.components_that_help([(values, scores, truth)], {1: 0.2, 2: 0.5, 3: 0.5}, [1, 2, 3]) == (1,)
    # over several references their mean decides (the second neither gains nor loses)
    whole = values.copy()
    whole[14:17, 14:17, 14:17] = 0
    assert strategies.components_that_help([(values, np.full_like(scores, 5.0), truth), (whole, scores, truth)], 0.5,
                                           [1, 2, 3]) == (1,)


def test_postprocess_auto_keeps_what_the_references_chose_and_a_task_file_records_it(tmp_path, capsys, monkeypatch):
    """--postprocess auto (the default): the classes the calibration picks keep their largest component alone, the
    line says so, a task file records them and a run from it keeps them; none and largest_component as given."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "hippocampus_026_0000.nii.gz").symlink_to(QUERY)
    calibrated = strategies.calibrated_threshold
    monkeypatch.setattr(strategies, "calibrated_threshold",
                        lambda *args, **kwargs: calibrated(*args, **kwargs)._replace(largest_component=(2,)))
    kept = []
    keep = predictor_module.keep_largest_components
    monkeypatch.setattr(predictor_module, "keep_largest_components",
                        lambda segmentation, values: kept.append(list(values)) or keep(segmentation, values))
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "out"), "-r", REFERENCE]) == 0
    assert "the largest connected component alone of 1 of 2 classes (2): the references score better so" \
        in capsys.readouterr().out
    assert kept == [[2]]
    task = tmp_path / "task.pt"
    assert main(["-r", REFERENCE, "--save_task", str(task)]) == 0 and TaskEmbedding.load(task).largest_component == (2,)
    capsys.readouterr()
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o1"), "--task", str(task)]) == 0
    assert "(2): as the task file records" in capsys.readouterr().out and kept[-1] == [2]
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o2"), "--task", str(task),
                 "--postprocess", "none"]) == 0
    assert len(kept) == 2  # none: nothing kept
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o3"), "-r", REFERENCE,
                 "--postprocess", "largest_component"]) == 0
    assert kept[-1] == [1, 2]
    # a threshold and a step given: the references are segmented once more to decide
    assert main(["-i", str(tmp_path / "q"), "-o", str(tmp_path / "o4"), "-r", REFERENCE, "--threshold", "0.4",
                 "-step_size", "0.5"]) == 0
    assert kept[-1] == [2] and "the references score better so" in capsys.readouterr().out
    # the network's classes and the fused ones (decided at the network's threshold) keep their largest component
    # alone as the references showed; a class by the registration alone is its registered label, which they cannot test
    predictor = IrisPredictor()
    predictor.initialize_from_model_folder(None)
    references = parse_reference(REFERENCE, 1)
    task = predictor.encode_references(references).pool.mean()
    for fusion, expected in (({1: "on", 2: "off"}, (2,)), ({1: "off", 2: "on"}, (2,)), ("on", (2,)),
                             ({1: "off", 2: "registration"}, ()), ({1: "registration", 2: "off"}, (2,)),
                             ("registration", ())):
        set_fusion(predictor, fusion)
        run_threshold(predictor, AUTO_THRESHOLD, task, references, AUTO_STEP, strategies.AUTO_POSTPROCESS)
        assert predictor.largest_component == expected, fusion
