"""Shared fixtures: an isolated nnU-Net folder layout per test, and the real data when present."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import SimpleITK as sitk

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def repeatable_registrations():
    """ITK on one thread: its multithreaded metric sums move a registration by a few voxels from run to run, and
    iris_predict fuses with a registration by default, so tests that compare two runs voxel for voxel need this."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


@pytest.fixture
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders, set in the environment."""
    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return folders


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; the test is skipped when it is absent."""
    if not (SHARED_DATA / "Dataset001_Hippocampus" / "dataset.json").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def link_real_dataset(shared: Path, raw: Path, name: str, num_cases: int | None = None) -> Path:
    """Link a real dataset (all cases, or the first `num_cases`) into a test's nnUNet_raw."""
    import json

    src = shared / name
    dst = raw / name
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    dataset_json = json.loads((src / "dataset.json").read_text())
    cases = sorted(f.name[: -len(dataset_json["file_ending"])] for f in (src / "labelsTr").iterdir())
    cases = cases[:num_cases] if num_cases else cases
    for case in cases:
        os.symlink(src / "labelsTr" / f"{case}{dataset_json['file_ending']}",
                   dst / "labelsTr" / f"{case}{dataset_json['file_ending']}")
        os.symlink(src / "imagesTr" / f"{case}_0000{dataset_json['file_ending']}",
                   dst / "imagesTr" / f"{case}_0000{dataset_json['file_ending']}")
    dataset_json["numTraining"] = len(cases)
    (dst / "dataset.json").write_text(json.dumps(dataset_json))
    return dst


def cli_error(capsys: pytest.CaptureFixture, main: Callable[[list[str]], object], prog: str,
              argv: Sequence[str]) -> str:
    """Run a command's main expecting a user error: exit 2, no traceback, one `prog: error: ...` line on stderr and
    it the last (progress bars share stderr); returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), err
    assert err.strip().splitlines()[-1].endswith(errors[0]), err
    return errors[0]
