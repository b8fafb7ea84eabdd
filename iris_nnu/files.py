"""Writing files so that an interrupted run never leaves a half-written one: a temporary name, then a rename."""
from __future__ import annotations

import json
import os
from typing import Callable


def temporary_name(path: str | os.PathLike) -> str:
    """A hidden name beside `path` that keeps its full ending ('.nii.gz', '.pth'): writers pick the format by it."""
    folder, name = os.path.split(os.fspath(path))
    dot = name.find(".", 1)
    stem, ending = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    return os.path.join(folder, f".{stem}.partial{os.getpid()}{ending}")


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(temporary path), then rename it to `path`; nothing is left behind if writing fails."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj: dict | list, path: str | os.PathLike) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    write_atomic(path, dump)
