"""How fast a reference's label is carried onto a query, per mask (registration fusion, issue 21).

`iris_predict --registration_fusion` warps each class's mask of every reference onto the query with linear
interpolation (inference/registration.warp_masks: a soft map per class). A whole brain has 85 of them on a 1 mm grid,
so the warping, not the registration, was the larger part of a fused brain query. This registers one reference onto
one query as iris_predict does (deformable_transform), then times, side by side on the one transform:
  warp_masks      every mask in one pass
  sitk.Resample   one call per mask (`--resample_masks` of them, the time scaled to all masks)
and prints the largest difference between the two (they compute the same interpolation). One thread. No model is run.

Run: python benchmarks/warp_speed.py [--data DIR] [--dataset 2 --query oasis_001 --reference oasis_007]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402 - the dataset and file lookup, shared

from iris_nnu.errors import cli_entry  # noqa: E402
from iris_nnu.inference.registration import deformable_transform, warp_masks  # noqa: E402


@cli_entry("benchmarks/warp_speed.py")
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("IRIS_DATA", "../shared/data"))
    p.add_argument("--dataset", default="2")
    p.add_argument("--query", default="oasis_001")
    p.add_argument("--reference", default="oasis_007")
    p.add_argument("--resample_masks", type=int, default=3, help="masks timed with one sitk.Resample each")
    args = p.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    folder = accuracy.find_dataset(Path(args.data), args.dataset)
    fixed = sitk.ReadImage(accuracy.image_file(folder, args.query))
    moving = sitk.ReadImage(accuracy.image_file(folder, args.reference))
    label = sitk.ReadImage(accuracy.label_file(folder, args.reference))
    labels = sitk.GetArrayFromImage(label)
    indices = [int(v) for v in np.unique(labels) if v > 0]
    start = time.perf_counter()
    transform = deformable_transform(fixed, moving)
    registration_s = time.perf_counter() - start
    start = time.perf_counter()
    warped = warp_masks(transform, fixed, labels, indices, label.GetSpacing(), label.GetOrigin(), label.GetDirection())
    warp_s = time.perf_counter() - start
    timed = indices[:max(1, args.resample_masks)]
    start = time.perf_counter()
    difference = 0.0
    for row, index in enumerate(timed):
        mask = sitk.Cast(label == index, sitk.sitkFloat32)
        resampled = sitk.GetArrayFromImage(sitk.Resample(mask, fixed, transform, sitk.sitkLinear, 0.0,
                                                         sitk.sitkFloat32))
        difference = max(difference, float(np.abs(resampled - warped[row]).max()))
    resample_s = (time.perf_counter() - start) / len(timed) * len(indices)
    print(f"{folder.name}: {args.reference} onto {args.query}, {len(indices)} masks on {fixed.GetSize()} voxels, "
          f"one thread")
    print("| step | seconds | per mask |\n| --- | --- | --- |")
    print(f"| registration (deformable_transform) | {registration_s:.1f} | |")
    print(f"| warp_masks, every mask | {warp_s:.1f} | {warp_s / len(indices):.3f} |")
    print(f"| sitk.Resample, one per mask ({len(timed)} timed) | {resample_s:.1f} | {resample_s / len(indices):.3f} |")
    print(f"\nwarp_masks {resample_s / warp_s:.0f}x faster than one Resample per mask; largest difference "
          f"{difference:.2e} over the {len(timed)} masks compared")
    return 0


if __name__ == "__main__":
    main()
