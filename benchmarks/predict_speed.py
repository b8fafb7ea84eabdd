"""iris_predict speed and memory, side by side with nnU-Net's predictor on the same query, in one run.

Rows (targets from the issue):
  1. per-query wall time, file in -> file out, Iris (K=1, task encoded beforehand) vs nnUNetPredictor with a plain
     nnU-Net network (dynamic_network_architectures PlainConvUNet, the same widths, 2 convs per stage) on the
     same query and plan: at most 1.15x;
  2. Iris K=16 vs K=1 per query: at most 1.3x (nnU-Net with 17 outputs shown too);
  3. 10 queries: the task encoded once vs re-encoded for every query (what a per-query tool would do);
  4. peak memory of one query (resident memory above the level before the call; on CUDA torch's peak);
  and the sliding window alone on the same preprocessed query, to separate the networks from the pipelines.
On CPU nnU-Net is timed twice: with its Conv3d layers routed to oneDNN like Iris's (the comparison: same conv
backend) and stock (PyTorch sends small batch-1 3D convs to a much slower kernel).
Both predictors read, preprocess (crop, normalise, resample), slide the window with Gaussian weights, export in
the query's geometry and write. Times are the minimum over interleaved repeats, wall and CPU seconds. On a
machine shared with other jobs use --threads 1: with more threads than free cores, OpenMP barriers stall and the
many small ops of the Iris network suffer most. Weights are random: speed and memory do not depend on them.
--large adds 93 classes on a 256x256x160 query (peak memory of the class maps and export).

Run: python benchmarks/predict_speed.py [--threads 1] [--large] [--widths 8,16,32,64,128] [--patch 48] [--tta]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from iris_nnu.inference import IrisPredictor, Query, parse_reference, write_model_folder  # noqa: E402
from iris_nnu.inference.images import read_images  # noqa: E402
from iris_nnu.model import build_network  # noqa: E402
from iris_nnu.model.ops import Conv3d  # noqa: E402
from iris_nnu.preprocessing.planner import MemberSummary, plan_collection  # noqa: E402

QUERY_SPACING = (1.0, 1.0, 1.2)  # x, y, z: resampled to the plan's 1 mm, so both exports resample back


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


# ------------------------------------------------------------------------------------------- data
def write_image(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(QUERY_SPACING)
    sitk.WriteImage(image, str(path))


def synthetic_case(shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like body with `num_classes` boxes of distinct brightness on a grid (every class survives resampling)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = zz**2 / 0.9 + yy**2 / 0.8 + xx**2 / 0.8 < 1
    label = np.zeros(shape, np.uint16)
    side = int(np.ceil(num_classes ** (1 / 3)))
    cells = [np.linspace(0.25, 0.75, side + 1) * s for s in shape]
    for k in range(num_classes):
        i, j, m = k // side**2, (k // side) % side, k % side
        box = tuple(slice(int(c[a]) + 1, int(c[a + 1]) - 1) for c, a in zip(cells, (i, j, m)))
        label[box] = 10 + 7 * k
    image = np.where(body, 1.0, 0.0) + (label > 0) * (0.2 + 0.05 * (label % 13))
    image = (image + rng.normal(0, 0.05, shape) * body) * 500
    return image.astype(np.float32), label


# ------------------------------------------------------------------------------------------- models
def iris_plans(widths: tuple[int, ...], patch: int, blocks: int, spacing: float = 1.0) -> tuple[dict, dict]:
    """The iris planner's joint plan for a synthetic MR member, with the benchmark's widths, patch and spacing."""
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 3, "shapes_after_crop": [[patch] * 3] * 3,
                   "foreground_intensity_properties_per_channel": {"0": {}},
                   "median_relative_size_after_cropping": 1.0}
    dataset_json = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "foreground": 1}, "numTraining": 3,
                    "file_ending": ".nii.gz"}
    plans = plan_collection([MemberSummary("Dataset001_Bench", dataset_json, fingerprint)], target_spacing=spacing,
                            memory_gb=64)
    configuration = plans["configurations"]["3d_fullres"]
    configuration["patch_size"] = [patch] * 3
    configuration["architecture"]["arch_kwargs"].update(features_per_stage=list(widths), blocks_per_stage=blocks)
    return plans, dataset_json


def nnunet_predictor(plans: dict, widths: tuple[int, ...], num_classes: int, device: torch.device, tta: bool,
                     step: float, onednn: bool):
    """nnUNetPredictor with a PlainConvUNet of the same widths, on the same plan (nnU-Net's z-score norm).

    onednn: its Conv3d layers routed to oneDNN like Iris's (PyTorch sends small batch-1 3D convs on CPU to a
    kernel 5-10x slower; see iris_nnu.model.ops.Conv3d), so the ratio compares pipelines, not conv backends."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {**plans, "configurations": {"3d_fullres": {**plans["configurations"]["3d_fullres"],
                                                        "normalization_schemes": ["ZScoreNormalization"],
                                                        "use_mask_for_norm": [False],
                                                        "preprocessor_name": "DefaultPreprocessor"}}}
    n = len(widths)
    network = PlainConvUNet(1, n, widths, nn.Conv3d, 3, [1] + [2] * (n - 1), 2, num_classes + 1, 2, conv_bias=True,
                            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()
    if onednn:
        for module in network.modules():
            if type(module) is nn.Conv3d:
                module.__class__ = Conv3d
    labels = {"background": 0, **{f"c{k}": k for k in range(1, num_classes + 1)}}
    dataset_json = {"channel_names": {"0": "MR"}, "labels": labels, "file_ending": ".nii.gz"}
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=step, use_mirroring=tta, device=device, allow_tqdm=False)
    manager = PlansManager(plans)
    predictor.manual_initialization(network, manager, manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], dataset_json, "nnUNetTrainer", (0, 1, 2))
    return predictor


# ------------------------------------------------------------------------------------------- measuring
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


class PeakMemory:
    """Peak memory above the level at entry: resident set sampled every 2 ms (Linux, after returning freed memory
    to the OS), or torch's CUDA peak."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, float("nan")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if _LIBC is not None:  # hand memory freed by earlier calls back to the OS, or it hides this call's peak
            _LIBC.malloc_trim(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        if not os.path.exists("/proc/self/statm"):
            return self
        self._base = self._max = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._max = max(self._max, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base


@dataclass
class Measure:
    """Wall seconds, CPU seconds of this process (all threads: less sensitive to other load), peak bytes."""

    wall: float = float("inf")
    cpu: float = float("inf")
    peak: float = float("nan")

    def __add__(self, other: Measure) -> Measure:
        return Measure(self.wall + other.wall, self.cpu + other.cpu, max(self.peak, other.peak))

    def best(self, other: Measure) -> Measure:
        """Minimum over repeats (peak memory of the fastest run)."""
        return Measure(min(self.wall, other.wall), min(self.cpu, other.cpu),
                       other.peak if other.wall < self.wall else self.peak)


def timed(fn, device: torch.device) -> Measure:
    with PeakMemory(device) as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Measure(wall, cpu, memory.peak)


def run_large(args: argparse.Namespace, work: Path, device: torch.device, onednn: bool) -> dict:
    """Many classes on a large volume, one run each: Iris (all classes in one forward per window, class maps
    bounded by the predictor's memory budget) and nnU-Net (K+1 softmax channels) with a 2 mm plan."""
    plans, dataset_json = iris_plans(args.widths, args.patch, args.blocks, spacing=2.0)
    torch.manual_seed(0)
    write_model_folder(str(work / "model_large"), plans, dataset_json,
                       build_network(plans["configurations"]["3d_fullres"]["architecture"], 1))
    image, label = synthetic_case(args.large_shape, args.large_k, seed=7)
    for name, array in (("large_ref", image), ("large_ref_seg", label)):
        write_image(array, work / f"{name}.nii.gz")
    write_image(synthetic_case(args.large_shape, args.large_k, seed=8)[0], work / "large_0000.nii.gz")
    del image, label
    query = Query("large", [str(work / "large_0000.nii.gz")])
    iris = IrisPredictor(tile_step_size=args.step_size, use_mirroring=args.tta, device=device)
    iris.initialize_from_model_folder(str(work / "model_large"))
    task = iris.encode_references(parse_reference(f"{work}/large_ref.nii.gz:{work}/large_ref_seg.nii.gz", 1)).pool
    preprocessed = [s * 1.0 / 2.0 for s in args.large_shape]
    passes = -(-task.num_classes // iris.classes_in_one_pass([round(s) for s in preprocessed]))
    measured = timed(lambda: iris.predict_queries([query], str(work / "large_iris"), task, progress=False), device)
    nnunet = nnunet_predictor(plans, args.widths, task.num_classes, device, args.tta, args.step_size, onednn)
    os.makedirs(work / "large_nnunet", exist_ok=True)

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            nnunet.predict_from_files_sequential([query.images], str(work / "large_nnunet"), save_probabilities=False,
                                                 overwrite=True, folder_with_segs_from_prev_stage=None)

    return {"iris": measured, "nnunet": timed(run, device), "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=_ints, default=(8, 16, 32, 64, 128), help="features per stage (both networks)")
    ap.add_argument("--blocks", type=int, default=2, help="Iris residual blocks per stage")
    ap.add_argument("--patch", type=int, default=48, help="patch edge (multiple of 16)")
    ap.add_argument("--shape", type=_ints, default=(48, 64, 64), help="query and reference array shape (z,y,x)")
    ap.add_argument("--k", type=int, default=16, help="the many-class K compared with K=1")
    ap.add_argument("--queries", type=int, default=10, help="queries of the encode-once vs re-encode row")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the per-query rows (minimum reported)")
    ap.add_argument("--step_size", type=float, default=0.5)
    ap.add_argument("--tta", action="store_true", help="mirroring TTA on (both predictors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--large", action="store_true",
                    help="add one run of many classes on a large volume: --large_k classes on --large_shape at "
                         "1 mm, with a 2 mm plan (Iris and nnU-Net, peak memory and time; a few minutes on 2 cores)")
    ap.add_argument("--large_k", type=int, default=93)
    ap.add_argument("--large_shape", type=_ints, default=(160, 256, 256), help="z,y,x")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    work = Path(tempfile.mkdtemp(prefix="iris_predict_speed_"))
    try:
        bench(args, work, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args: argparse.Namespace, work: Path, device: torch.device) -> None:
    plans, dataset_json = iris_plans(args.widths, args.patch, args.blocks)
    torch.manual_seed(0)
    write_model_folder(str(work / "model"), plans, dataset_json,
                       build_network(plans["configurations"]["3d_fullres"]["architecture"], 1))
    (work / "q").mkdir()
    refs = {}
    for k in (1, args.k):
        image, label = synthetic_case(args.shape, k, seed=k)
        write_image(image, work / f"ref{k}.nii.gz")
        write_image(label, work / f"ref{k}_seg.nii.gz")
        refs[k] = parse_reference(f"{work}/ref{k}.nii.gz:{work}/ref{k}_seg.nii.gz", 1)
    for i in range(max(args.queries, 1)):
        write_image(synthetic_case(args.shape, args.k, seed=100 + i)[0], work / "q" / f"q{i:02d}_0000.nii.gz")
    queries = [Query(f"q{i:02d}", [str(work / "q" / f"q{i:02d}_0000.nii.gz")]) for i in range(args.queries)]
    query = queries[0]

    iris = IrisPredictor(tile_step_size=args.step_size, use_mirroring=args.tta, device=device)
    iris.initialize_from_model_folder(str(work / "model"))
    tasks = {k: iris.encode_references(refs[k]).pool for k in refs}
    onednn = device.type == "cpu"  # no backend quirk to correct for elsewhere: stock is the comparison
    nnunet = {(k, o): nnunet_predictor(plans, args.widths, k, device, args.tta, args.step_size, o)
              for k in refs for o in {onednn, False}}

    def run_iris(k: int) -> None:
        iris.predict_queries([query], str(work / f"iris{k}"), tasks[k], progress=False)

    def run_nnunet(k: int, onednn_convs: bool) -> None:
        folder = work / f"nnunet{k}{onednn_convs}"
        os.makedirs(folder, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            nnunet[k, onednn_convs].predict_from_files_sequential([query.images], str(folder),
                                                                  save_probabilities=False, overwrite=True,
                                                                  folder_with_segs_from_prev_stage=None)

    # the sliding window alone, on the same preprocessed query: how much of the difference is the network
    data, properties = read_images(query.images, iris.reader_writer_class())
    data, _, properties = iris.preprocessing(data, None, properties)
    window_input = torch.from_numpy(data)

    def window_iris() -> None:
        iris.segment_preprocessed(data, properties, tasks[1], export=False, preprocessed_labels=True)

    def window_nnunet() -> None:
        nnunet[1, onednn].predict_sliding_window_return_logits(window_input)

    runs = {"iris1": lambda: run_iris(1), "irisK": lambda: run_iris(args.k),
            "nnunet1": lambda: run_nnunet(1, onednn), "nnunetK": lambda: run_nnunet(args.k, onednn),
            "stock1": lambda: run_nnunet(1, False), "stockK": lambda: run_nnunet(args.k, False),
            "window_iris": window_iris, "window_nnunet": window_nnunet}
    best = {name: Measure() for name in runs}
    for r in range(args.repeats + 1):  # round 0 warms up (oneDNN primitives, caches)
        for name, fn in runs.items():
            measured = timed(fn, device)
            if r:
                best[name] = best[name].best(measured)

    # interleaved per query, so load from other processes hits both paths alike
    def encode() -> None:
        tasks["once"] = iris.encode_references(refs[args.k]).pool

    encoding = timed(encode, device)
    once = each = Measure(0.0, 0.0, 0.0)
    for q in queries:
        once += timed(lambda: iris.predict_queries([q], str(work / "once"), tasks["once"], progress=False), device)
        each += timed(lambda: iris.predict_queries([q], str(work / "each"),
                                                   iris.encode_references(refs[args.k]).pool, progress=False),
                      device)
    once += encoding
    large = run_large(args, work, device, onednn) if args.large else None

    print(f"\n{device} ({torch.get_num_threads()} threads); widths {args.widths}, Iris {args.blocks} blocks/stage "
          f"({sum(p.numel() for p in iris.network.parameters()) / 1e6:.2f} M params); patch {args.patch}^3, step "
          f"{args.step_size}, TTA {'on' if args.tta else 'off'}; query {args.shape[::-1]} voxels (x,y,z) at "
          f"{QUERY_SPACING} mm -> plan 1 mm; file in -> file out; min of {args.repeats}; "
          f"time = wall s (CPU s of all threads)\n")

    def secs(m: Measure) -> str:
        return f"{m.wall:.2f} s ({m.cpu:.2f})"

    def ratio(a: Measure, b: Measure) -> str:
        return f"{a.wall / b.wall:.2f}x ({a.cpu / b.cpu:.2f}x)"

    def mem(m: Measure) -> str:
        return f"{m.peak / 1024**2:.0f} MB"

    b, k = best, args.k
    rows = [
        ("per query, K=1", secs(b["iris1"]), secs(b["nnunet1"]), ratio(b["iris1"], b["nnunet1"]),
         secs(b["stock1"]), "<= 1.15x"),
        (f"per query, K={k}", secs(b["irisK"]), secs(b["nnunetK"]), ratio(b["irisK"], b["nnunetK"]),
         secs(b["stockK"]), ""),
        ("sliding window only, K=1", secs(b["window_iris"]), secs(b["window_nnunet"]),
         ratio(b["window_iris"], b["window_nnunet"]), "-", "(the networks)"),
        (f"K={k} / K=1 per query", ratio(b["irisK"], b["iris1"]), ratio(b["nnunetK"], b["nnunet1"]), "",
         ratio(b["stockK"], b["stock1"]), "Iris <= 1.3x"),
        (f"{args.queries} queries, encode once", secs(once), "-", ratio(once, each), "-", ""),
        (f"{args.queries} queries, encode each", secs(each), "-", "", "-", f"(encode {encoding.wall:.2f} s)"),
        ("peak memory per query, K=1", mem(b["iris1"]), mem(b["nnunet1"]),
         f"{b['iris1'].peak / b['nnunet1'].peak:.2f}x", mem(b["stock1"]), ""),
        (f"peak memory per query, K={k}", mem(b["irisK"]), mem(b["nnunetK"]),
         f"{b['irisK'].peak / b['nnunetK'].peak:.2f}x", mem(b["stockK"]), ""),
    ]
    if large:
        name = f"K={args.large_k} on {'x'.join(map(str, args.large_shape[::-1]))}"
        rows.append((f"{name}: time", secs(large["iris"]), secs(large["nnunet"]),
                     ratio(large["iris"], large["nnunet"]), "-", f"{large['passes']} pass(es)"))
        rows.append((f"{name}: peak memory", mem(large["iris"]), mem(large["nnunet"]),
                     f"{large['iris'].peak / large['nnunet'].peak:.2f}x", "-", "bounded"))
    head = ("measurement", "Iris", "nnU-Net" + (" (oneDNN convs)" if onednn else ""), "ratio",
            "nnU-Net stock", "target")
    cells = [head, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for i, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
