"""Training throughput of iris_train with 1 process against N DDP processes (-num_gpus N, gloo on CPU, or GPUs).

A real dataset is planned (CPU plan unless --plan_for gpu) into a temporary folder, then `iris_train` runs with 1 and
with N processes in turn, `--repeats` times each, alternating so machine noise hits both. Each run trains
--epochs epochs of --iterations iterations; the figure is the median epoch time of the epochs after the first
(start-up and warm-up excluded), from the trainer's log. One iteration trains on the plans' batch in both cases
(split over the processes with DDP), so samples per second compare directly. On CPU every run gets the same total
number of threads (--threads, divided among the processes).

    python benchmarks/distributed_speed.py [--data ../shared/data] [-d 1] [-n 2] [--threads 2] [-device cpu]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCH_TIME = re.compile(r"^\S+ \S+: Epoch time: ([0-9.]+) s", re.MULTILINE)  # the timestamped (log file) lines


def run_training(env: dict, fold: int, processes: int, args: argparse.Namespace) -> list[float]:
    """Epoch times (s) of one iris_train run, from its log."""
    command = [sys.executable, "-m", "iris_nnu.trainers.train", str(args.d), str(fold),
               "-device", args.device, "-num_gpus", str(processes), "--epochs", str(args.epochs),
               "--iterations_per_epoch", str(args.iterations), "--val_iterations", "0"]
    threads = max(1, args.threads // processes) if args.device == "cpu" else args.threads
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"distributed_speed: iris_train failed:\n{done.stderr[-2000:]}")
    return [float(t) for t in EPOCH_TIME.findall(done.stdout)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with DatasetXXX_Name")
    p.add_argument("-d", type=int, default=1, help="dataset id")
    p.add_argument("-n", type=int, default=2, help="DDP processes to compare with 1")
    p.add_argument("-device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--plan_for", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run in all (divided among processes)")
    args = p.parse_args()
    source = next(Path(args.data).glob(f"Dataset{args.d:03d}_*"), None)
    if source is None:
        sys.exit(f"distributed_speed: no Dataset{args.d:03d}_* in {args.data}")
    with tempfile.TemporaryDirectory(prefix="iris_ddp_speed_") as tmp:
        env = {**os.environ, "nnUNet_n_proc_DA": "0"}
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[name] = os.path.join(tmp, name)
            os.makedirs(env[name])
        os.symlink(source, os.path.join(env["nnUNet_raw"], source.name))
        subprocess.run([sys.executable, "-m", "iris_nnu.preprocessing.plan_and_preprocess", "-d", str(args.d),
                        "--plan_for", args.plan_for, "-np", str(args.threads)], env=env, check=True,
                       capture_output=True)
        epochs: dict[int, list[float]] = {1: [], args.n: []}
        for repeat in range(args.repeats):
            for processes in (1, args.n):
                times = run_training(env, repeat % 5, processes, args)
                epochs[processes] += times[1:]  # the first epoch holds start-up and warm-up
                print(f"run {repeat + 1}, {processes} process(es): epoch times {times}", file=sys.stderr)
    one, many = statistics.median(epochs[1]), statistics.median(epochs[args.n])
    print(f"| processes | s / epoch of {args.iterations} iterations (median) | iterations / s | speed-up |")
    print("| --- | --- | --- | --- |")
    for processes, seconds in ((1, one), (args.n, many)):
        print(f"| {processes} | {seconds:.2f} | {args.iterations / seconds:.2f} | {one / seconds:.2f}x |")
    print(f"\ndataset {source.name}, device {args.device}, plan {args.plan_for}, {args.threads} thread(s) in all")


if __name__ == "__main__":
    main()
