"""Structure names: label value -> name, from a dataset.json's labels or a --label_names file."""
from __future__ import annotations

import json
import os

from iris_nnu.errors import IrisInputError


def dataset_json_names(folder: str) -> dict[int, str]:
    """{value: name} of the non-background labels of `folder`/dataset.json ({} when there is none)."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            labels = json.load(f).get("labels", {})
        return {int(value): str(name) for name, value in labels.items() if int(value) != 0}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise IrisInputError(f"{path}: cannot read its labels ({e})") from None


def read_label_names(path: str) -> dict[int, str]:
    """A --label_names file: JSON {"value": "name", ...} (values positive integers)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise IrisInputError(f"--label_names {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise IrisInputError(f"--label_names {path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise IrisInputError(f'--label_names {path}: expected {{"value": "name", ...}}, e.g. {{"1": "liver"}}')
    names = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except ValueError:
            raise IrisInputError(f'--label_names {path}: key "{key}" is not a label value (an integer)') from None
        if value <= 0:
            raise IrisInputError(f"--label_names {path}: label value {value} must be positive (0 is background)")
        names[value] = name.strip()
    return names


def structure_name(value: int, names: dict[int, str] | None) -> str:
    """The name of a label value, 'label {value}' when it has none."""
    return (names or {}).get(int(value)) or f"label {int(value)}"
