"""iris_export_model / iris_install_model, and loading models without running code from their files."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import cli_error
from test_predict import build_model_folder, make_case

from iris_nnu.errors import IrisInputError
from iris_nnu.inference.model_folder import load_model_folder
from iris_nnu.inference.model_zip import export_main, install_main
from iris_nnu.inference.predict import main as predict_main

ROOT = "Dataset900_Synth/IrisTrainer__IrisPlans__3d_fullres"


def predict(model: Path, refs: Path, out: Path) -> np.ndarray:
    assert predict_main(["-i", str(refs / "query.nii.gz"), "-o", str(out), "-m", str(model), "-device", "cpu",
                         "-r", f"{refs / 'ref.nii.gz'}:{refs / 'ref_seg.nii.gz'}"]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "query.nii.gz")))


@pytest.fixture
def exported(tmp_path: Path) -> dict:
    model = build_model_folder(tmp_path / "results" / ROOT, seed=3)  # random weights with foreground on the query
    (model / "MODEL_CARD.md").write_text("# a card\n")
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps({**manifest, "collection": "Dataset900_Synth",
                                                     "plans_identifier": "IrisPlans"}))
    refs = tmp_path / "refs"
    refs.mkdir()
    make_case(refs / "ref.nii.gz", refs / "ref_seg.nii.gz", seed=11)
    make_case(refs / "query.nii.gz", None, seed=20)
    return {"model": model, "refs": refs, "zip": tmp_path / "model.zip", "tmp": tmp_path}


def test_export_then_install_predicts_exactly_as_the_original(exported: dict, nnunet_env: dict):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"]), "--fp32"]) == 0
    with zipfile.ZipFile(exported["zip"]) as z:
        names = set(z.namelist())
    assert {f"{ROOT}/{f}" for f in ("plans.json", "dataset.json", "manifest.json", "MODEL_CARD.md",
                                    "fold_0/checkpoint_final.pth")} == names
    assert install_main([str(exported["zip"])]) == 0
    installed = nnunet_env["nnUNet_results"] / ROOT
    assert (installed / "MODEL_CARD.md").read_text() == "# a card\n"
    original = predict(exported["model"], exported["refs"], exported["tmp"] / "out_original")
    again = predict(installed, exported["refs"], exported["tmp"] / "out_installed")
    assert (original > 0).sum() > 100
    np.testing.assert_array_equal(original, again)
    # the default export stores fp16 weights: smaller, and close
    small = exported["tmp"] / "small.zip"
    assert export_main(["-m", str(exported["model"]), "-o", str(small)]) == 0
    assert small.stat().st_size < exported["zip"].stat().st_size


def test_install_refuses_to_overwrite_and_replaces_with_overwrite(exported: dict, tmp_path: Path, capsys):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    target = tmp_path / "installed"
    assert install_main([str(exported["zip"]), "-o", str(target)]) == 0
    assert "already exists" in cli_error(capsys, install_main, "iris_install_model",
                                         [str(exported["zip"]), "-o", str(target)])
    (target / "stale.txt").write_text("old")
    assert install_main([str(exported["zip"]), "-o", str(target), "--overwrite"]) == 0
    assert not (target / "stale.txt").exists() and load_model_folder(str(target)).network is not None


@pytest.mark.parametrize("entry, problem", [("/etc/evil.json", "outside the install folder"),
                                            (f"{ROOT}/../../evil.json", "outside the install folder"),
                                            ("other/folder/plans.json", "not an iris_export_model zip")])
def test_install_refuses_a_zip_that_writes_elsewhere(exported: dict, tmp_path: Path, capsys, entry, problem):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(exported["zip"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(entry, "{}")
    line = cli_error(capsys, install_main, "iris_install_model", [str(bad), "-o", str(tmp_path / "target")])
    assert problem in line and str(bad) in line
    assert not (tmp_path / "target").exists() and not (tmp_path / "evil.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".iris_install_")]


def test_install_refuses_a_symbolic_link_entry(exported: dict, tmp_path: Path, capsys):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    bad = tmp_path / "link.zip"
    with zipfile.ZipFile(exported["zip"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        link = zipfile.ZipInfo(f"{ROOT}/fold_0/link.pth")
        link.external_attr = (0o120777 << 16)
        dst.writestr(link, "/etc/passwd")
    assert "symbolic link" in cli_error(capsys, install_main, "iris_install_model",
                                        [str(bad), "-o", str(tmp_path / "target")])


class _RunsCode:
    """Unpickling this calls a function of the file's choosing (here: writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, capsys):
    model = build_model_folder(tmp_path / "model")
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "marker.txt"
    torch.save({**saved, "payload": _RunsCode(str(marker))}, checkpoint)
    with pytest.raises(IrisInputError, match="not a readable iris_train checkpoint"):
        load_model_folder(str(model))
    assert not marker.exists()
    line = cli_error(capsys, export_main, "iris_export_model", ["-m", str(model), "-o", str(tmp_path / "m.zip")])
    assert str(checkpoint) in line and not marker.exists() and not (tmp_path / "m.zip").exists()
