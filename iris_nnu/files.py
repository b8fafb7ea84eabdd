"""Writing files so that an interrupted run never leaves a half-written one: a temporary name, then a rename."""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

# temporary_name's pattern: .{stem}.partial{pid}{ending}
_PARTIAL = re.compile(r"^\.(?P<stem>.+)\.partial(?P<pid>\d+)(?P<ending>\..*)?$")
# A partial file is stale when its process is not alive on this machine and it has not changed for this long: a
# process on another machine writing into a shared folder (-num_parts across nodes) keeps its file changing.
STALE_AFTER_S = 60


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:
        return False
    return True


def remove_stale_partials(folder: str | os.PathLike, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the temporary files (temporary_name) that processes no longer alive left in `folder` (killed while
    writing); returns their names. Files of live processes, of this one, and recent ones are kept."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    now = time.time()
    for name in sorted(os.listdir(folder)):
        match = _PARTIAL.match(name)
        path = os.path.join(folder, name)
        if not match or not os.path.isfile(path) or os.path.islink(path):
            continue
        pid = int(match["pid"])
        try:
            if pid == os.getpid() or _alive(pid) or now - os.path.getmtime(path) < stale_after_s:
                continue
            os.remove(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        removed.append(name)
    return removed
