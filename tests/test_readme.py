"""Every Python block of the README runs as written (on small inputs and the bundled model)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from iris_nnu.io.model_folder import DEFAULT_MODEL_FOLDER

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "iris_nnu" / "demo_data" / "Dataset001_Hippocampus"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def _box(shape, lo, hi) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return mask


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    # the names the blocks take as given: small tensors, a five-fold model folder, a reference and a scan
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_FOLDER, model)
    for fold in range(1, 5):
        shutil.copytree(model / "fold_0", model / f"fold_{fold}")
    shutil.copy(DEMO / "imagesTr" / "hippocampus_004_0000.nii.gz", "ref.nii.gz")
    shutil.copy(DEMO / "labelsTr" / "hippocampus_004.nii.gz", "ref_seg.nii.gz")
    shutil.copy(DEMO / "imagesTr" / "hippocampus_026_0000.nii.gz", "scan.nii.gz")
    Path("scans").mkdir()
    shutil.copy(DEMO / "imagesTr" / "hippocampus_040_0000.nii.gz", "scans/hippocampus_040_0000.nii.gz")
    torch.manual_seed(0)
    patch, scan = (1, 32, 32, 32), (48, 64, 40)
    namespace = {
        "reference_image": torch.randn(1, *patch), "query": torch.randn(1, *patch),
        "reference_masks": torch.stack([_box(patch[1:], (4, 4, 4), (14, 20, 12)),
                                        _box(patch[1:], (16, 8, 10), (28, 24, 30))])[None],
        "ref_crop": torch.randn(1, *patch), "ref_crop_masks": _box((1, 1, *patch[1:]), (8, 8, 8), (20, 20, 20)),
        "whole_scan_masks": _box((1, 1, *scan), (16, 24, 12), (28, 36, 24)), "query_crop": torch.randn(1, *patch),
        "crop_start": (8, 16, 4), "crop_size": patch[1:], "scan_shape": scan, "MODEL_FOLDER": str(model),
    }
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert Path("task.pt").is_file()
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "labelsTr" / "hippocampus_026.nii.gz")))
    segmentation = namespace["result"].segmentation
    assert segmentation.shape == truth.shape
    hits = np.logical_and(segmentation > 0, truth > 0).sum()
    assert 2 * hits / ((segmentation > 0).sum() + (truth > 0).sum()) > 0.7  # the bundled model segments the scan
    assert namespace["failures"] == [] and Path("out/hippocampus_040.nii.gz").is_file()
    assert sitk.ReadImage("scan.nii.gz").GetSize() == namespace["label_image"].GetSize()
    assert namespace["logits"].shape == (2, *namespace["prepared"].data.shape[1:])  # the last block's, 2 classes
