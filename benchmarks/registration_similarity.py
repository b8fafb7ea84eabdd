"""Does a registration say when it failed? The measurement behind --registration_fusion auto's fallback (issue 21).

`--registration_fusion auto` decides on one pair of references (the second segmented from the first). A query cut
unlike them can register far worse than they do onto each other, and then the registered labels mislead. Per query,
reference #1 is registered onto it as iris_predict registers (inference/registration.py), and this prints how alike
the two scans look after it (`registration_similarity`: the correlation of their intensities over the query's body)
beside the registered labels' Dice against the query's own (classes the query lacks left out). The first row is
reference #2, the pair a run decides on; "share" is each query's correlation over that row's
(strategies.SIMILARITY_SHARE is the share below which a query falls back to the network). No model is run.

Run: python benchmarks/registration_similarity.py --held_out FILE --dataset 3 --queries 6 [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402 - the case picking and Dice over labelled classes, shared
from registration_fusion import labels_from  # noqa: E402

from iris_nnu.errors import cli_entry  # noqa: E402
from iris_nnu.files import write_json_atomic  # noqa: E402
from iris_nnu.inference.names import dataset_json_names  # noqa: E402
from iris_nnu.inference.registration import (grid_transform, registration_grid,  # noqa: E402
                                             registration_similarity, warp_masks)
from iris_nnu.inference.strategies import SIMILARITY_SHARE  # noqa: E402


def registered_onto(fixed: sitk.Image, moving_grid: sitk.Image, moving_label: sitk.Image, classes: list[int],
                    seed: int) -> tuple[float, np.ndarray]:
    """registration_similarity of the moving scan (on its registration grid) registered onto `fixed`, as
    registered_label_maps registers, and its label carried over (each class's mask warped, the most covered class
    where it covers more than half)."""
    fixed_grid = registration_grid(fixed)
    transform = grid_transform(fixed_grid, moving_grid, seed)
    similarity = registration_similarity(fixed_grid, moving_grid, transform)
    maps = warp_masks(transform, fixed, sitk.GetArrayFromImage(moving_label), classes,
                      moving_label.GetSpacing(), moving_label.GetOrigin(), moving_label.GetDirection())
    return similarity, labels_from(maps, classes, 0.5)


@cli_entry("benchmarks/registration_similarity.py")
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("IRIS_DATA", "../shared/data"))
    p.add_argument("--held_out", required=True, help="JSON {dataset: [held-out cases]} (a model's held_out.json)")
    p.add_argument("--dataset", default="3")
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="picks the references, as accuracy.py's --seed")
    p.add_argument("--output", default=None, help="also write the rows as JSON")
    args = p.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    folder = accuracy.find_dataset(Path(args.data), args.dataset)
    held_out = json.loads(Path(args.held_out).read_text())[folder.name]
    # accuracy.py's references (its default --n_references 5 picked with the seed): #1 registered, #2 the pair
    queries, refs = accuracy.pick_cases(folder, held_out, args.queries, 5, args.seed)
    classes = sorted(dataset_json_names(str(folder)))
    moving_grid = registration_grid(sitk.ReadImage(accuracy.image_file(folder, refs[0])))  # made once
    moving_label = sitk.ReadImage(accuracy.label_file(folder, refs[0]))
    rows = []
    for case in [refs[1], *queries]:
        fixed = sitk.ReadImage(accuracy.image_file(folder, case))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(accuracy.label_file(folder, case)))
        similarity, registered = registered_onto(fixed, moving_grid, moving_label, classes, args.seed)
        dice = accuracy.labelled_dice(truth, registered, classes)
        rows.append({"case": case, "similarity": similarity, "dice": dice,
                     "mean_dice": accuracy.nanmean(list(dice.values()))})
        print(f"{case}: correlation {similarity:.3f}, registration Dice {rows[-1]['mean_dice']:.3f}", file=sys.stderr,
              flush=True)
    pair = rows[0]["similarity"]
    print(f"\n{folder.name}, reference {refs[0]} registered onto each ({refs[1]}: the pair a run decides on); "
          f"a query below share {SIMILARITY_SHARE} falls back to the network")
    print("| case | correlation | share | registration Dice |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['case']} | {row['similarity']:.3f} | {row['similarity'] / pair:.2f} | {row['mean_dice']:.3f} |")
    if args.output:
        write_json_atomic(accuracy.json_ready({"command": " ".join(sys.argv), "reference": refs[0], "rows": rows}),
                          args.output)
    return 0


if __name__ == "__main__":
    main()
