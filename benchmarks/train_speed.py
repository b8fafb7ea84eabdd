"""Seconds per training iteration: IrisTrainer vs nnUNetTrainer with the same backbone widths, patch and batch.

Both read the same preprocessed data (a dataset planned by iris_plan_and_preprocess into a temporary folder):
Iris through its episodic loader, nnU-Net through its own loader with a ResidualEncoderUNet (the same 2 residual
blocks per encoder stage as Iris's backbone). Iterations alternate between the two trainers so machine noise hits
both; one iteration = next batch + train_step (forward, backward, optimiser step), deep supervision on.

    python benchmarks/train_speed.py [--data ../shared/data] [-d 1] [--memory_gb 1] [--iterations 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def nnunet_plans(iris_plans: dict) -> dict:
    """Iris's plans with nnU-Net's ResidualEncoderUNet of the same widths and blocks in place of IrisNetwork."""
    plans = json.loads(json.dumps(iris_plans))
    configuration = plans["configurations"]["3d_fullres"]
    widths = configuration["architecture"]["arch_kwargs"]["features_per_stage"]
    blocks = configuration["architecture"]["arch_kwargs"]["blocks_per_stage"]
    n = len(widths)
    configuration["architecture"] = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": widths, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": [blocks] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return plans


def main() -> None:
    default_data = REPO.parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data), help="folder holding raw DatasetXXX_Name folders")
    p.add_argument("-d", type=int, default=1, help="dataset id to plan and train on")
    p.add_argument("--memory_gb", type=float, default=1.0, help="planner budget (sets widths and patch)")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per trainer (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    if not any(Path(args.data).glob(f"Dataset{args.d:03d}_*")):
        sys.exit(f"train_speed: no Dataset{args.d:03d}_* in {args.data}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("nnUNet_preprocessed", "nnUNet_results"):
            os.makedirs(f"{tmp}/{name}")
            os.environ[name] = f"{tmp}/{name}"
        os.environ["nnUNet_raw"] = str(Path(args.data).resolve())
        os.environ["nnUNet_n_proc_DA"] = "0"
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from iris_nnu.preprocessing.collection import load_collection
        from iris_nnu.preprocessing.plan_and_preprocess import main as plan
        from iris_nnu.trainers.iris_trainer import IrisTrainer

        plan(["-d", str(args.d), "-np", str(args.threads), "--memory_gb", str(args.memory_gb)])
        collection = load_collection(args.d)
        device = torch.device("cpu")
        with contextlib.redirect_stdout(io.StringIO()):
            iris = IrisTrainer(dict(collection.plans), "3d_fullres", 0, collection.dataset_json, device)
            nnunet = nnUNetTrainer(dict(nnunet_plans(collection.plans), continue_training=False), "3d_fullres", 0,
                                   collection.dataset_json, device)
            for trainer in (iris, nnunet):
                trainer.num_epochs, trainer.num_iterations_per_epoch = 1, args.iterations + 2
                trainer.on_train_start()
                trainer.on_train_epoch_start()
        times: dict[str, list[float]] = {"IrisTrainer": [], "nnUNetTrainer": []}
        for i in range(args.iterations + 2):
            for name, trainer in (("IrisTrainer", iris), ("nnUNetTrainer", nnunet)):
                start = time.perf_counter()
                trainer.train_step(next(trainer.dataloader_train))
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        configuration = collection.plans["configurations"]["3d_fullres"]
        print(f"\nDataset {args.d}: patch {configuration['patch_size']}, batch {configuration['batch_size']}, widths "
              f"{configuration['architecture']['arch_kwargs']['features_per_stage']}, {args.threads} threads, "
              f"{args.iterations} alternating iterations each (median)")
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, value in medians.items():
            print(f"{name:14s} {value:7.2f} s/iteration")
        print(f"ratio IrisTrainer/nnUNetTrainer: {medians['IrisTrainer'] / medians['nnUNetTrainer']:.2f}x "
              f"(target <= 2.3x: two encoder passes)")


if __name__ == "__main__":
    main()
