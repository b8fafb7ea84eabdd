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
from iris_nnu.io.model_folder import load_model_folder
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


def copy_zip(source: Path, target: Path, rename=lambda name: name, extra: dict[str, bytes] | None = None,
             skip=lambda name: False, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A copy of an exported zip with entries renamed or left out, and extra entries {name: bytes}."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            if not skip(info.filename):
                dst.writestr(rename(info.filename), src.read(info))
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return target


def declare_size(zip_path: Path, name: str, size: int) -> None:
    """Rewrite the uncompressed size the zip's central directory declares for entry `name`."""
    data = bytearray(zip_path.read_bytes())
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        name_length = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_length] == name.encode():
            data[at + 24:at + 28] = size.to_bytes(4, "little")
            break
        at += 4
    zip_path.write_bytes(bytes(data))


def nothing_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith((".iris_install_", ".iris_replaced_"))]


def test_extra_slashes_in_entry_names_write_nothing_outside(exported: dict, tmp_path: Path, capsys):
    # the raw-name slice of the old extraction put 'A////B../.bashrc' at home/.bashrc (issue 22)
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    bad = copy_zip(exported["zip"], tmp_path / "slashes.zip", lambda n: n.replace(ROOT, "A/B.."),
                   {"A////B../.bashrc": b"echo owned\n"})
    home = tmp_path / "home"
    home.mkdir()
    line = cli_error(capsys, install_main, "iris_install_model", [str(bad), "-o", str(home / "iris_model")])
    assert "'A////B../.bashrc'" in line and "not a plain relative path" in line
    assert [p.name for p in home.iterdir()] == [] and not (tmp_path / ".bashrc").exists()
    # the same entries without the odd one install by their checked names, inside the target only
    good = copy_zip(exported["zip"], tmp_path / "dots.zip", lambda n: n.replace(ROOT, "A/B.."))
    assert install_main([str(good), "-o", str(home / "iris_model")]) == 0
    assert sorted(p.name for p in home.iterdir()) == ["iris_model"]
    assert (home / "iris_model" / "plans.json").is_file()


def test_a_zip_bomb_is_refused_before_it_is_written(exported: dict, tmp_path: Path, capsys):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    target = tmp_path / "target"
    # an entry that declares 4 GiB (over the 1 GiB per-file cap): refused from the zip's directory, nothing unpacked
    declared = copy_zip(exported["zip"], tmp_path / "declared.zip", extra={f"{ROOT}/fold_0/big.bin": b"x" * 1000})
    declare_size(declared, f"{ROOT}/fold_0/big.bin", 4 * 2**30 - 1)
    line = cli_error(capsys, install_main, "iris_install_model", [str(declared), "-o", str(target)])
    assert "unpacks to 4096 MiB" in line and "1024 MiB per file" in line
    assert not target.exists() and nothing_left(tmp_path)
    # 64 MiB of zeros deflate to ~64 KB: 1000x, over the 100x allowed above 1 MiB
    zeros = copy_zip(exported["zip"], tmp_path / "zeros.zip", extra={f"{ROOT}/fold_0/zeros.bin": bytes(64 << 20)})
    assert zeros.stat().st_size - exported["zip"].stat().st_size < 1 << 20
    line = cli_error(capsys, install_main, "iris_install_model", [str(zeros), "-o", str(target)])
    assert "unpacks to 64 MiB" in line and "100x" in line
    assert not target.exists() and nothing_left(tmp_path)
    # a zip that declares less than it holds: the bytes past the declared size are never written
    lying = copy_zip(exported["zip"], tmp_path / "lying.zip",
                     extra={f"{ROOT}/fold_0/noise.bin": np.random.default_rng(0).bytes(300_000)})
    declare_size(lying, f"{ROOT}/fold_0/noise.bin", 1000)
    line = cli_error(capsys, install_main, "iris_install_model", [str(lying), "-o", str(target)])
    assert "is corrupt" in line and "noise.bin" in line
    assert not target.exists() and nothing_left(tmp_path)


def test_a_zip_without_a_fold_or_with_broken_plans_leaves_the_installed_model_intact(exported: dict, tmp_path: Path,
                                                                                      capsys):
    assert export_main(["-m", str(exported["model"]), "-o", str(exported["zip"])]) == 0
    target = tmp_path / "installed"
    assert install_main([str(exported["zip"]), "-o", str(target)]) == 0
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    no_fold = copy_zip(exported["zip"], tmp_path / "nofold.zip", skip=lambda n: "/fold_" in n)
    line = cli_error(capsys, install_main, "iris_install_model", [str(no_fold), "-o", str(target), "--overwrite"])
    assert "holds no fold" in line
    plans = json.loads((target / "plans.json").read_text())
    del plans["configurations"]["3d_fullres"]["architecture"]
    broken = copy_zip(exported["zip"], tmp_path / "broken.zip", skip=lambda n: n.endswith("plans.json"),
                      extra={f"{ROOT}/plans.json": json.dumps(plans).encode()})
    line = cli_error(capsys, install_main, "iris_install_model", [str(broken), "-o", str(target), "--overwrite"])
    assert "does not load" in line and "plans.json" in line
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before and load_model_folder(str(target)).network is not None
    assert nothing_left(tmp_path)


def test_export_never_follows_links(exported: dict, tmp_path: Path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    card = exported["model"] / "MODEL_CARD.md"
    card.unlink()
    card.symlink_to(secret)
    line = cli_error(capsys, export_main, "iris_export_model", ["-m", str(exported["model"]), "-o",
                                                                 str(exported["zip"])])
    assert str(card) in line and "symbolic link" in line and not exported["zip"].exists()
