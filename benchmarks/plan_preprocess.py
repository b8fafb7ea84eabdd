"""Wall time and peak memory: `iris_plan_and_preprocess` vs `nnUNetv2_plan_and_preprocess`, side by side.

Both plan and preprocess the same raw dataset from scratch (fresh nnUNet_preprocessed each run) with the same
process count; runs alternate so machine noise hits both. Peak memory is the largest sum of RSS over the
command's whole process tree, sampled every 50 ms.

    python benchmarks/plan_preprocess.py [--data ../shared/data] [-d 1] [-np 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree_rss_bytes(pid: int) -> int:
    """Sum of RSS over a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def measure(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak tree RSS bytes) of a command; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr.read()[-2000:]}")
    return wall, peak


def main() -> None:
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data), help="folder holding the raw DatasetXXX_Name folders")
    p.add_argument("-d", type=int, default=1, help="dataset id")
    p.add_argument("-np", type=int, default=2, help="process count for both tools")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not any(Path(args.data).glob(f"Dataset{args.d:03d}_*")):
        sys.exit(f"plan_preprocess: no Dataset{args.d:03d}_* in {args.data}")
    commands = {
        "nnUNetv2_plan_and_preprocess": ["nnUNetv2_plan_and_preprocess", "-d", str(args.d), "-c", "3d_fullres",
                                         "-np", str(args.np), "-npfp", str(args.np)],
        "iris_plan_and_preprocess": ["iris_plan_and_preprocess", "-d", str(args.d), "-np", str(args.np)],
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for r in range(args.repeats):
        for name, command in commands.items():
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "nnUNet_raw": str(Path(args.data).resolve()),
                       "nnUNet_preprocessed": tmp, "nnUNet_results": tmp}
                wall, peak = measure(command, env)
            results[name].append((wall, peak))
            print(f"run {r + 1}/{args.repeats} {name}: {wall:.1f} s, peak {peak / 2**20:.0f} MiB", flush=True)
    print(f"\nDataset {args.d}, -np {args.np}, {args.repeats} alternating runs each (median)")
    print(f"{'command':32s} {'wall s':>8s} {'peak MiB':>9s}")
    medians = {}
    for name, runs in results.items():
        medians[name] = (statistics.median(w for w, _ in runs), statistics.median(m for _, m in runs))
        print(f"{name:32s} {medians[name][0]:8.1f} {medians[name][1] / 2**20:9.0f}")
    (nw, nm), (iw, im) = medians["nnUNetv2_plan_and_preprocess"], medians["iris_plan_and_preprocess"]
    print(f"ratio iris/nnU-Net: wall {iw / nw:.2f}x, peak memory {im / nm:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
