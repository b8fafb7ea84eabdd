"""iris_predict --statistics: per structure voxel count, volume (ml) and mean query intensity (TotalSegmentator's
--statistics is the model), as {case}_statistics.json and .csv."""
from __future__ import annotations

import csv
import json
from typing import Sequence

import numpy as np

from iris_nnu.files import write_atomic
from iris_nnu.inference.names import structure_name

JSON_SUFFIX = "_statistics.json"
CSV_SUFFIX = "_statistics.csv"


def structure_statistics(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float], classes: Sequence[int],
                         names: dict[int, str] | None) -> list[dict]:
    """One row per class: label, name, voxels, volume_ml (voxels x voxel volume of the query's grid) and
    mean_intensity (of the query's first channel inside it; None when empty; with several channels also
    mean_intensity_0001, ...). `labels` (Z, Y, X), `image` (C, Z, Y, X), `spacing` in mm."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    rows = []
    for value in classes:
        inside = labels == int(value)
        voxels = int(inside.sum())
        row = {"label": int(value), "name": structure_name(value, names), "voxels": voxels,
               "volume_ml": voxels * voxel_ml}
        for c in range(image.shape[0]):
            key = "mean_intensity" if c == 0 else f"mean_intensity_{c:04d}"
            row[key] = float(image[c][inside].mean(dtype=np.float64)) if voxels else None
        rows.append(row)
    return rows


def write_statistics(rows: list[dict], target: str, spacing: Sequence[float]) -> tuple[str, str]:
    """target_statistics.json ({"voxel_volume_ml", "structures": rows}) and .csv (one row per structure), each
    written atomically; returns their paths."""
    json_path, csv_path = target + JSON_SUFFIX, target + CSV_SUFFIX
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    document = {"voxel_spacing_mm": [float(s) for s in spacing], "voxel_volume_ml": voxel_ml, "structures": rows}

    def dump_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2)

    def dump_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["label", "name", "voxels", "volume_ml"])
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    write_atomic(csv_path, dump_csv)
    write_atomic(json_path, dump_json)
    return json_path, csv_path
