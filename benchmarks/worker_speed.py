"""Wall time of iris_predict over a folder of real queries with and without background workers (-npp / -nps).

The bundled default model (or -m) segments the first --queries held-out cases of a dataset, one-shot from its first
training case, once per worker setting, settings alternating over --repeats rounds so machine noise hits all of
them; each run is a whole `iris_predict` invocation (model load and task encoding included, the same in every
setting). Prints the median wall time per setting and its ratio to the first.

    python benchmarks/worker_speed.py [--data ../shared/data] [-d 1] [--queries 20] [--workers 0,0 1,1 2,2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "iris_nnu" / "default_model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with DatasetXXX_Name")
    p.add_argument("-d", type=int, default=1, help="dataset id")
    p.add_argument("-m", default=str(DEFAULT_MODEL), help="model folder (its held_out.json picks the queries)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--workers", nargs="+", default=["0,0", "1,1", "2,2"], help="-npp,-nps settings to compare")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    args = p.parse_args()
    source = next(Path(args.data).glob(f"Dataset{args.d:03d}_*"), None)
    if source is None:
        sys.exit(f"worker_speed: no Dataset{args.d:03d}_* in {args.data}")
    held_out = set(json.loads((Path(args.m) / "held_out.json").read_text())[source.name])
    cases = sorted(f.name[:-len(".nii.gz")] for f in (source / "labelsTr").glob("*.nii.gz"))
    queries = [c for c in cases if c in held_out][:args.queries]
    reference = next(c for c in cases if c not in held_out)
    times: dict[str, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="iris_worker_speed_") as tmp:
        folder = Path(tmp) / "queries"
        folder.mkdir()
        for case in queries:
            os.symlink(source / "imagesTr" / f"{case}_0000.nii.gz", folder / f"{case}_0000.nii.gz")
        ref = f"{source}/imagesTr/{reference}_0000.nii.gz:{source}/labelsTr/{reference}.nii.gz"
        for repeat in range(args.repeats):
            for setting in args.workers:
                npp, nps = setting.split(",")
                out = Path(tmp) / f"out_{repeat}_{npp}_{nps}"
                command = [sys.executable, "-m", "iris_nnu.inference.predict", "-m", args.m, "-i", str(folder),
                           "-o", str(out), "-r", ref, "-npp", npp, "-nps", nps, "-device", "cpu"]
                start = time.perf_counter()
                done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                                      capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    sys.exit(f"worker_speed: iris_predict failed:\n{done.stderr[-2000:]}")
                times[setting].append(seconds)
                print(f"round {repeat + 1}, -npp {npp} -nps {nps}: {seconds:.1f} s", file=sys.stderr)
    first = statistics.median(times[args.workers[0]])
    print(f"| -npp,-nps | s for {len(queries)} queries (median of {args.repeats}) | s / query | vs {args.workers[0]} |")
    print("| --- | --- | --- | --- |")
    for setting, values in times.items():
        median = statistics.median(values)
        print(f"| {setting} | {median:.1f} | {median / len(queries):.2f} | {median / first:.2f}x |")
    print(f"\ndataset {source.name}, reference {reference}, {args.threads} thread(s) per run, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
