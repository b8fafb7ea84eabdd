"""iris_evaluate: Dice per class and case (nnU-Net's metrics), summary.json, overlays, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_error
from synthetic import blob_volume, write_volume

from iris_nnu.inference.evaluate import main

VALUES = np.array([0, 17, 2035], dtype=np.uint16)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    gt, pred, images = tmp_path / "gt", tmp_path / "pred", tmp_path / "images"
    for d in (gt, pred, images):
        d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image, label = blob_volume((16, 20, 20), rng, "MR", 2)
        label = VALUES[label]
        write_volume(label, (1.0, 1.0, 1.5), str(gt / f"case{i}.nii.gz"))
        write_volume(image, (1.0, 1.0, 1.5), str(images / f"case{i}_0000.nii.gz"))
        prediction = label.copy()
        if i == 1:  # half of class 17 missed, as background
            z = np.nonzero(label == 17)[0]
            prediction[(label == 17) & (np.arange(16)[:, None, None] < np.median(z))] = 0
        write_volume(prediction, (1.0, 1.0, 1.5), str(pred / f"case{i}.mha"))  # other format, same case names
    return {"gt": gt, "pred": pred, "images": images, "root": tmp_path}


def test_dice_per_class_and_case_summary_and_overlays(folders, capsys):
    main(["-ref", str(folders["gt"]), "-pred", str(folders["pred"]), "--overlays", str(folders["root"] / "png"),
          "--images", str(folders["images"])])
    out = capsys.readouterr().out
    assert "foreground mean Dice" in out and "2035" in out
    summary = json.loads((folders["pred"] / "summary.json").read_text())
    per_case = {Path(r["prediction_file"]).name: r["metrics"] for r in summary["metric_per_case"]}
    assert set(per_case) == {"case0.mha", "case1.mha", "case2.mha"}
    assert per_case["case0.mha"]["17"]["Dice"] == 1.0 and per_case["case0.mha"]["2035"]["Dice"] == 1.0
    m = per_case["case1.mha"]["17"]
    assert 0 < m["Dice"] < 1 and m["Dice"] == pytest.approx(2 * m["TP"] / (2 * m["TP"] + m["FP"] + m["FN"]))
    assert m["FP"] == 0 and m["FN"] > 0
    assert summary["mean"]["17"]["Dice"] == pytest.approx(np.mean([per_case[c]["17"]["Dice"] for c in per_case]))
    assert set(summary["mean"]) == {"17", "2035"}
    pngs = sorted(p.name for p in (folders["root"] / "png").iterdir())
    assert pngs == ["case0.png", "case1.png", "case2.png"]
    assert (folders["root"] / "png" / "case1.png").read_bytes()[:4] == b"\x89PNG"


def test_labels_output_file_and_missing_predictions(folders, capsys):
    (folders["pred"] / "case2.mha").unlink()
    out = folders["root"] / "s.json"
    main(["-ref", str(folders["gt"]), "-pred", str(folders["pred"]), "-o", str(out), "--labels", "2035", "-np", "2"])
    summary = json.loads(out.read_text())
    assert set(summary["mean"]) == {"2035"} and len(summary["metric_per_case"]) == 2
    assert "case2.nii.gz" in capsys.readouterr().err


def expect_error(capsys, *argv: str) -> str:
    return cli_error(capsys, main, "iris_evaluate", argv)


def test_bad_input(folders, capsys):
    gt, pred = str(folders["gt"]), str(folders["pred"])
    assert "nope: prediction folder not found" in expect_error(capsys, "-ref", gt, "-pred", f"{pred}/nope")
    empty = folders["root"] / "empty"
    empty.mkdir()
    assert "no prediction" in expect_error(capsys, "-ref", gt, "-pred", str(empty))
    write_volume(np.zeros((16, 20, 18), np.uint8), (1.0, 1.0, 1.5), str(folders["pred"] / "case0.mha"))
    msg = expect_error(capsys, "-ref", gt, "-pred", pred)
    assert "case0.mha: size" in msg and "case0.nii.gz" in msg
    (folders["pred"] / "case0.mha").write_bytes(b"garbage")
    assert "case0.mha: unreadable image" in expect_error(capsys, "-ref", gt, "-pred", pred)
    assert ".json" in expect_error(capsys, "-ref", gt, "-pred", pred, "-o", str(folders["root"] / "s.txt"))


def test_labels_and_cases_left_out_are_reported_and_fractional_labels_refused(folders, capsys):
    # issue 22: predicted labels missing from the ground truth and extra predictions were ignored without a word
    gt, pred = str(folders["gt"]), str(folders["pred"])
    import SimpleITK as sitk

    case0 = sitk.GetArrayFromImage(sitk.ReadImage(str(folders["pred"] / "case0.mha")))
    with_extra = case0.copy()
    with_extra[0, 0, :3] = 99  # a label no ground truth holds
    write_volume(with_extra, (1.0, 1.0, 1.5), str(folders["pred"] / "case0.mha"))
    write_volume(case0, (1.0, 1.0, 1.5), str(folders["pred"] / "stray.mha"))  # no ground truth of that name
    main(["-ref", gt, "-pred", pred])
    err = capsys.readouterr().err
    assert "1 prediction(s) without ground truth, not evaluated: stray.mha" in err
    assert "predicted label value(s) 99 are in no ground truth" in err
    summary = json.loads((folders["pred"] / "summary.json").read_text())
    assert summary["not_evaluated"]["predicted_labels_absent_from_ground_truth"] == [99]
    main(["-ref", gt, "-pred", pred, "--labels", "17"])
    assert "2035 left out by --labels" in capsys.readouterr().err
    # 1.5 was read as background by the metrics
    fractional = case0.astype(np.float32)
    fractional[fractional == 17] = 1.5
    write_volume(fractional, (1.0, 1.0, 1.5), str(folders["pred"] / "case0.mha"))
    msg = expect_error(capsys, "-ref", gt, "-pred", pred)
    assert "case0.mha: label values must be integers, found 1.5" in msg
