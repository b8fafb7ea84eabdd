"""Learning curves: train a recipe for a fixed CPU budget, report held-out one-shot Dice per member at checkpoints.

A recipe is a planned collection (resolution, patch and network come from `iris_plan_and_preprocess`; several
plans live side by side under different nnUNet_preprocessed roots) plus the episode settings below. Every
`--every` CPU-minutes of training the run stops the clock and segments the first `--eval_cases` validation cases
of fold 0 of each member one-shot (IrisTrainer's final validation: whole cases, original geometry, nnU-Net's
Dice), all classes in one pass and, with `--per_pass`, one class per pass too: a model that reads its reference
segments each class alone as well as all together. The learning rate follows the CPU budget (warm-up, then
exponential decay to 1% at the end), so recipes of different speeds are compared at equal cost.

CPU time is the process's (`time.process_time`), evaluation excluded; run with OMP_NUM_THREADS=1 and
nnUNet_n_proc_DA=0 so that it is the whole cost of training.

Run: OMP_NUM_THREADS=1 nnUNet_n_proc_DA=0 python benchmarks/learning_curves.py 900 --minutes 30 --every 5 \\
         --name 2mm-32 --per_pass --output curves_2mm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from iris_nnu.files import write_json_atomic  # noqa: E402
from iris_nnu.preprocessing.collection import load_collection  # noqa: E402
from iris_nnu.preprocessing.planner import CONFIGURATION, PLANS_IDENTIFIER  # noqa: E402
from iris_nnu.trainers import episodes  # noqa: E402
from iris_nnu.trainers.iris_trainer import IrisTrainer, WarmupExponentialLR  # noqa: E402
from iris_nnu.trainers.validation import one_shot_validation, reference_following  # noqa: E402


class BudgetReached(Exception):
    """Raised after the last checkpoint's evaluation to leave nnU-Net's epoch loop."""


class CPUTimeSchedule(WarmupExponentialLR):
    """IrisTrainer's schedule over a nominal 80k iterations (2.5% warm-up, as the paper's 2k of 80k), indexed by
    the share of the CPU budget spent instead of the iteration."""

    NOMINAL_ITERATIONS = 80_000

    def __init__(self, trainer: CurveTrainer, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, trainer.initial_lr, self.NOMINAL_ITERATIONS,
                         final_fraction=trainer.final_lr_fraction)
        self.trainer = trainer

    def set_iteration(self, iteration: int) -> None:
        progress = min(1.0, self.trainer.training_seconds() / self.trainer.budget_seconds)
        super().set_iteration(round(progress * (self.total - 1)))


class CurveTrainer(IrisTrainer):
    """IrisTrainer that evaluates at CPU-time checkpoints and stops at the budget."""

    budget_seconds: float = 0.0
    every_seconds: float = 0.0
    eval_cases: int = 10
    per_pass: bool = False
    rows: list[dict]

    def start_clock(self) -> None:
        self.rows, self._excluded, self._t0 = [], 0.0, time.process_time()
        self._next_checkpoint = self.every_seconds

    def training_seconds(self) -> float:
        return time.process_time() - self._t0 - self._excluded

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        self.lr_schedule = CPUTimeSchedule(self, optimizer)
        return optimizer, self.lr_schedule

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        spent = self.training_seconds()
        if spent < self._next_checkpoint and spent < self.budget_seconds:
            return
        paused = time.process_time()
        iterations = self.current_epoch * self.num_iterations_per_epoch
        row = {"cpu_minutes": round(spent / 60, 2), "iterations": iterations,
               "train_loss": float(self.logger.get_value("train_losses", step=-1))}
        row["joint"] = self._evaluate("joint", None)  # the validation functions run under no_grad in eval mode
        if self.per_pass:
            row["per_pass"] = self._evaluate("per_pass", 1)
            # asked for one class at a time, Dice with its own class minus the mean Dice with the others:
            # near 0 for a model that ignores its reference
            row["follows"] = {m: round(float(d.diagonal().mean() - d[~np.eye(len(d), dtype=bool)].mean()), 4)
                              for m, d in reference_following(self, self.eval_cases).items() if len(d) > 1}
        self.rows.append(row)
        print("CURVE " + json.dumps(row), flush=True)
        self._excluded += time.process_time() - paused
        while self._next_checkpoint <= spent:
            self._next_checkpoint += self.every_seconds
        if spent >= self.budget_seconds:
            raise BudgetReached

    def _evaluate(self, name: str, classes_per_pass: int | None) -> dict[str, dict]:
        """{member: {"mean": Dice, "per_class": {label: Dice}}} on the first eval_cases validation cases."""
        folder = f"curve_{name}"
        means = one_shot_validation(self, folder, self.eval_cases, classes_per_pass)
        out = {}
        for member, mean in means.items():
            summary = json.loads(Path(self.output_folder, folder, member, "summary.json").read_text())
            out[member] = {"mean": round(mean, 4),
                           "per_class": {k: round(v["Dice"], 4) for k, v in summary["mean"].items()}}
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/learning_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="planned collection (id or name)")
    p.add_argument("-p", default=PLANS_IDENTIFIER, help="plans identifier")
    p.add_argument("--name", default=None, help="recipe name in the report (default: the collection and plan)")
    p.add_argument("--minutes", type=float, default=30.0, help="CPU-minutes of training")
    p.add_argument("--every", type=float, default=5.0, help="CPU-minutes between evaluations")
    p.add_argument("--eval_cases", type=int, default=10, help="validation cases per member at each evaluation")
    p.add_argument("--per_pass", action="store_true", help="also decode one class per pass (joint-vs-separate "
                   "check) and measure how far each class alone follows its reference (own minus other Dice)")
    p.add_argument("--max_classes", type=int, default=None, help="classes per episode at most (default: the plan's)")
    p.add_argument("--full_episode_p", type=float, default=None,
                   help=f"share of episodes with the most classes (default {episodes.FULL_EPISODE_P})")
    p.add_argument("--colocated_p", type=float, default=None,
                   help=f"share of co-located episodes (default {episodes.COLOCATED_P})")
    p.add_argument("--off_anchor_p", type=float, default=None, help="share of a co-located episode's query crops "
                   f"after the first placed anywhere in the scan (default {episodes.OFF_ANCHOR_P})")
    p.add_argument("--iterations_per_epoch", type=int, default=20, help="iterations between clock checks")
    p.add_argument("--seed", type=int, default=0, help="seeds network initialisation and episodes")
    p.add_argument("--output", default="learning_curves.json", help="JSON report (rows are appended per recipe)")
    args = p.parse_args(argv)
    if args.full_episode_p is not None:
        episodes.FULL_EPISODE_P = args.full_episode_p
    if args.colocated_p is not None:
        episodes.COLOCATED_P = args.colocated_p
    if args.off_anchor_p is not None:
        episodes.OFF_ANCHOR_P = args.off_anchor_p
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # nnU-Net's patch placement draws from numpy's global generator
    collection = load_collection(args.dataset, args.p)
    plans = dict(collection.plans, continue_training=False)
    trainer = CurveTrainer(plans, CONFIGURATION, 0, collection.dataset_json, torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = 10**6, args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = 1
    trainer.episode_seed = args.seed
    if args.max_classes:
        trainer.max_classes_per_episode = args.max_classes
    trainer.budget_seconds, trainer.every_seconds = args.minutes * 60, args.every * 60
    trainer.eval_cases, trainer.per_pass = args.eval_cases, args.per_pass
    arch = collection.plans["configurations"][CONFIGURATION]
    recipe = {"name": args.name or f"{collection.name}/{args.p}", "collection": collection.name,
              "spacing": arch["spacing"], "patch_size": arch["patch_size"], "batch_size": arch["batch_size"],
              "arch_kwargs": arch["architecture"]["arch_kwargs"], "max_classes": trainer.max_classes_per_episode,
              "full_episode_p": episodes.FULL_EPISODE_P,
              "colocated_p": episodes.COLOCATED_P, "off_anchor_p": episodes.OFF_ANCHOR_P, "threads": torch.get_num_threads(), "seed": args.seed}
    print("RECIPE " + json.dumps(recipe), flush=True)
    trainer.start_clock()
    try:
        trainer.run_training()
    except BudgetReached:
        trainer.on_train_end()
    report = json.loads(Path(args.output).read_text()) if os.path.isfile(args.output) else []
    report.append({"recipe": recipe, "rows": trainer.rows})
    write_json_atomic(report, args.output)
    print(f"{'recipe':<24}{'CPU min':>8}{'iters':>7}  member: joint Dice (one class per pass) [follows]")
    for row in trainer.rows:
        cells = [f"{m.split('_', 1)[-1]}: {v['mean']:.3f}"
                 + (f" ({row['per_pass'][m]['mean']:.3f})" if "per_pass" in row else "")
                 + (f" [{row['follows'][m]:+.3f}]" if m in row.get("follows", {}) else "")
                 for m, v in row["joint"].items()]
        print(f"{recipe['name']:<24}{row['cpu_minutes']:>8.1f}{row['iterations']:>7}  " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
