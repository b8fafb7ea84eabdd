"""`iris_train DATASET [CONFIGURATION] FOLD`: episodic training of one Iris model on a planned collection."""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pickle
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iris_nnu.cli import HelpFormatter
from iris_nnu.device import add_device_argument, resolve_device
from iris_nnu.errors import IrisInputError, brief, cli_entry, require_env_folder
from iris_nnu.files import remove_stale_partials
from iris_nnu.io.model_folder import load_checkpoint
from iris_nnu.preprocessing.collection import load_collection
from iris_nnu.preprocessing.planner import CONFIGURATION, PLANS_IDENTIFIER
from iris_nnu.trainers.iris_trainer import IrisTrainer

# How long a rank waits for the others at a collective: rank 0 validates whole cases alone at the end while the
# others wait at a barrier. A rank that dies does not leave the others waiting this long: mp.spawn and torchrun
# stop the remaining processes.
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=4)
# What --c continues from, in nnU-Net's order (a finished run's final checkpoint first)
CONTINUE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")
# keys of a checkpoint that IrisTrainer.load_checkpoint needs
CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "current_epoch", "init_args", "logging", "_best_ema")


def resolve_trainer(name: str) -> type[IrisTrainer]:
    """A trainer class by name: IrisTrainer or a subclass of it (in iris_nnu.trainers or a dotted path).

    Iris resolves its own trainers: nnU-Net's name lookup imports modules that need torchvision.
    """
    if "." in name:
        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise IrisInputError(f"-tr {name}: cannot import ({e})") from None
    else:
        known = {c.__name__: c for c in [IrisTrainer, *_subclasses(IrisTrainer)]}
        if name not in known:
            raise IrisInputError(f"-tr {name}: unknown trainer; known: {', '.join(sorted(known))} "
                                 f"(or give a dotted path module.Class)")
        cls = known[name]
    if not (isinstance(cls, type) and issubclass(cls, IrisTrainer)):
        raise IrisInputError(f"-tr {name}: not a subclass of IrisTrainer")
    return cls


def _subclasses(cls: type) -> list[type]:
    return [s for c in cls.__subclasses__() for s in [c, *_subclasses(c)]]


def parse_fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be an integer or 'all', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iris_train",
        description="Train one Iris model on all members of a collection planned with iris_plan_and_preprocess. "
                    "Each iteration draws an episode from one member: query patches and reference patches of "
                    "other cases, mostly K classes, mostly co-located (all crops centred on one structure). "
                    "Output: a normal nnU-Net model folder "
                    "nnUNet_results/DatasetXXX_Name/IrisTrainer__IrisPlans__3d_fullres/fold_F.",
        formatter_class=HelpFormatter)
    p.add_argument("dataset", help="collection id (e.g. 900) or name (Dataset900_Name or Name)")
    p.add_argument("configuration_or_fold", metavar="[CONFIGURATION] FOLD",
                   help=f"fold of splits_final.json (0-4), or 'all'; nnU-Net's form DATASET CONFIGURATION FOLD "
                        f"works too (the only configuration is {CONFIGURATION})")
    p.add_argument("fold", nargs="?", help=argparse.SUPPRESS)
    add_device_argument(p)
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: 1000, or the "
                   "checkpoint's with --c)")
    p.add_argument("--iterations_per_epoch", type=int, default=None, help="training iterations per epoch "
                   "(default: 250, or the checkpoint's with --c)")
    p.add_argument("--val_iterations", type=int, default=None, help="validation episodes per epoch (default: 50, "
                   "or the checkpoint's with --c)")
    p.add_argument("--c", action="store_true", help="continue from the fold's checkpoint_final.pth, else "
                   "checkpoint_latest.pth: epoch, optimiser, learning-rate schedule, memory bank and log; without a "
                   "complete one it is an error (leave out --c to start fresh)")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="processes to train with on this machine (DistributedDataParallel, as nnU-Net's -num_gpus): "
                        "one per GPU with NCCL, or with -device cpu that many CPU processes with gloo; the plans' "
                        "batch is split over them. Across machines, start iris_train with torchrun instead")
    p.add_argument("-p", default=PLANS_IDENTIFIER, help="plans identifier")
    p.add_argument("-tr", default="IrisTrainer", help="trainer class: IrisTrainer, a subclass, or module.Class; "
                   "IrisTrainer_FineTune continues a trained model (--pretrained_weights) at a tenth of the learning "
                   "rate")
    p.add_argument("--pretrained_weights", "-pretrained_weights", default=None,
                   help="checkpoint to initialise the network from (nnU-Net's load_pretrained_weights); not with --c")
    p.add_argument("--val", action="store_true", help="only run the final one-shot validation of a finished fold")
    p.add_argument("--val_best", action="store_true", help="the final validation uses checkpoint_best.pth (best EMA "
                   "pseudo-Dice of the validation episodes) instead of the final weights, as nnU-Net's --val_best")
    p.add_argument("--npz", action="store_true", help="the final validation also saves per-class probabilities "
                   "(fold_F/validation/MEMBER/CASE.npz + .pkl, as nnU-Net's --npz)")
    return p


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments, with nnU-Net's DATASET CONFIGURATION FOLD folded into `fold`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configuration, fold = (CONFIGURATION, args.configuration_or_fold) if args.fold is None \
        else (args.configuration_or_fold, args.fold)
    if configuration != CONFIGURATION:
        raise IrisInputError(f"configuration {configuration!r}: Iris plans have only {CONFIGURATION}")
    try:
        args.fold = parse_fold(fold)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    return args


@cli_entry("iris_train")
def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    require_env_folder("nnUNet_results")
    if args.num_gpus < 1:
        raise IrisInputError(f"-num_gpus must be at least 1, got {args.num_gpus}")
    torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
    if torchrun_world > 1 and args.num_gpus != 1:
        raise IrisInputError("-num_gpus under torchrun: torchrun's --nproc_per_node and --nnodes set the processes")
    if torchrun_world > 1:  # started by torchrun: this process is one rank, the rendezvous is in the environment
        return run_rank(args, int(os.environ["RANK"]), torchrun_world, int(os.environ.get("LOCAL_RANK", "0")))
    trainer = build_trainer(args)  # checks the input once, in this process, before any worker starts
    if args.num_gpus == 1:
        return run_training(args, trainer)
    device = resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < args.num_gpus:
        raise IrisInputError(f"-num_gpus {args.num_gpus}: only {torch.cuda.device_count()} GPU(s) visible")
    if trainer.configuration_manager.batch_size < args.num_gpus:
        raise IrisInputError(f"-num_gpus {args.num_gpus}: the plans' batch size {trainer.configuration_manager.batch_size}"
                             f" is split over the processes; use at most that many")
    del trainer
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        mp.spawn(_spawned_rank, args=(args, args.num_gpus), nprocs=args.num_gpus, join=True)
    except mp.ProcessRaisedException as e:  # the others were stopped; their work up to the last checkpoint is kept
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        print(f"iris_train: error: rank {e.error_index} failed ({last}); the other ranks were stopped. Resume with "
              f"--c", file=sys.stderr)
        sys.exit(1)
    except mp.ProcessExitedException as e:
        print(f"iris_train: error: rank {e.error_index} exited with {e.exit_code}; the other ranks were stopped. "
              f"Resume with --c", file=sys.stderr)
        sys.exit(1)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, args: argparse.Namespace, world_size: int) -> None:
    run_rank(args, rank, world_size, rank)


def run_rank(args: argparse.Namespace, rank: int, world_size: int, local_rank: int) -> int:
    """One process of a distributed run: join the process group (NCCL on CUDA, gloo on CPU), train, leave."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                            world_size=world_size, timeout=DISTRIBUTED_TIMEOUT)
    try:
        return run_training(args, build_trainer(args))
    finally:
        dist.destroy_process_group()


def build_trainer(args: argparse.Namespace) -> IrisTrainer:
    """The trainer for the arguments (checked), with the run's settings; a distributed one inside a process group."""
    if args.c and args.pretrained_weights:
        raise IrisInputError("--c and --pretrained_weights exclude each other")
    if args.pretrained_weights and not os.path.isfile(args.pretrained_weights):
        raise IrisInputError(f"--pretrained_weights {args.pretrained_weights}: file not found")
    for flag in ("epochs", "iterations_per_epoch", "val_iterations"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "val_iterations" else 1):
            raise IrisInputError(f"--{flag} must be positive, got {value}")
    collection = load_collection(args.dataset, args.p)
    if args.fold != "all" and not 0 <= args.fold < len(collection.splits):
        raise IrisInputError(f"{collection.name}: fold {args.fold} has no split in "
                             f"{os.path.join(collection.folder, 'splits_final.json')} "
                             f"({len(collection.splits)} folds)")
    trainer_class = resolve_trainer(args.tr)
    device = resolve_device(args.device)
    fold_folder = os.path.join(require_env_folder("nnUNet_results"), collection.plans["dataset_name"],
                               f"{trainer_class.__name__}__{collection.plans['plans_name']}__{CONFIGURATION}",
                               f"fold_{args.fold}")
    removed = remove_stale_partials(fold_folder) if not dist.is_initialized() or dist.get_rank() == 0 else []
    if removed:
        print(f"iris_train: removed {len(removed)} partial file(s) a killed run left in {fold_folder}: "
              f"{', '.join(removed)}", file=sys.stderr)
    saved = None
    if args.c:  # before the trainer exists: it creates the fold folder and a log
        args.continue_from, saved = checkpoint_to_continue(fold_folder, removed)
    elif args.val:
        args.continue_from = os.path.join(fold_folder, "checkpoint_final.pth")
    if args.pretrained_weights:
        check_pretrained_weights(args.pretrained_weights)
    plans = dict(collection.plans, continue_training=args.c or args.val)
    trainer = trainer_class(plans, CONFIGURATION, args.fold, collection.dataset_json, device)
    if os.path.normpath(trainer.output_folder) != os.path.normpath(fold_folder):
        raise RuntimeError(f"{trainer_class.__name__} writes to {trainer.output_folder}, not {fold_folder}")

    if saved is not None:
        # continue with the run's own settings unless told otherwise (the schedule depends on them)
        saved = saved.get("iris_settings", {})
        trainer.num_epochs = saved.get("num_epochs", trainer.num_epochs)
        trainer.num_iterations_per_epoch = saved.get("num_iterations_per_epoch", trainer.num_iterations_per_epoch)
        trainer.num_val_iterations_per_epoch = saved.get("num_val_iterations_per_epoch",
                                                         trainer.num_val_iterations_per_epoch)
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = args.iterations_per_epoch
    if args.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = args.val_iterations

    if args.val and not os.path.isfile(os.path.join(trainer.output_folder, "checkpoint_final.pth")):
        raise IrisInputError(f"--val: {trainer.output_folder} has no checkpoint_final.pth; training is not finished")
    return trainer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {brief(e)}" if text else type(e).__name__


def checkpoint_to_continue(folder: str, removed: list[str]) -> tuple[str, dict]:
    """The first complete, readable checkpoint --c can continue from (final, then latest) and its contents; else
    one line naming what the fold folder holds and how to start fresh (nnU-Net starts a new run with a warning)."""
    fresh = "to start a fresh run, leave out --c"
    if not os.path.isdir(folder):
        raise IrisInputError(f"--c: {folder} does not exist: nothing to continue ({fresh})")
    problems = []
    for name in CONTINUE_CHECKPOINTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            checkpoint = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - truncated (killed while written) or foreign: say so, in one line
            problems.append(f"{name} is unreadable, truncated or not a checkpoint ({_first_line(e)})")
            continue
        missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
        if missing:
            problems.append(f"{name} is not an iris_train checkpoint (no {', '.join(missing)})")
            continue
        if problems:
            print(f"iris_train: warning: {'; '.join(problems)}; continuing from {name}", file=sys.stderr)
        return path, checkpoint
    names = sorted(os.listdir(folder))
    partial = [f for f in names if f.startswith(".") and ".partial" in f]
    others = [f for f in names if f.endswith(".pth") and f not in CONTINUE_CHECKPOINTS and f not in partial]
    found = "; ".join(problems + ([f"other files: {', '.join(others)}"] if others else [])
                      + ([f"removed partial file(s) of a killed run: {', '.join(removed)}"] if removed else [])
                      + ([f"partial file(s) of a running process: {', '.join(partial)}"] if partial else []))
    raise IrisInputError(f"--c: no complete checkpoint_final.pth or checkpoint_latest.pth in {folder} "
                         f"({found or 'no checkpoint files at all'}); {fresh} (it overwrites this fold's checkpoints)")


def check_pretrained_weights(path: str) -> None:
    """A readable checkpoint with network weights (loaded with weights_only=True); the architecture is checked when
    they are loaded into the network."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - truncated or foreign file: one line
        raise IrisInputError(f"--pretrained_weights {path}: unreadable, truncated or not a checkpoint "
                             f"({_first_line(e)})") from None
    if not isinstance(checkpoint.get("network_weights"), dict):
        raise IrisInputError(f"--pretrained_weights {path}: not an iris_train / nnU-Net checkpoint (no "
                             f"'network_weights'; it holds {', '.join(map(str, list(checkpoint)[:5])) or 'nothing'})")


def run_training(args: argparse.Namespace, trainer: IrisTrainer) -> int:
    """Load what the arguments ask for, train, validate (as nnU-Net's run_training)."""
    if args.c or args.val:  # the checkpoint build_trainer checked (nnU-Net's maybe_load_checkpoint picks by name)
        if not trainer.was_initialized:
            trainer.initialize()
        try:
            trainer.load_checkpoint(args.continue_from)
        except (KeyError, RuntimeError, ValueError, TypeError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise IrisInputError(f"{args.continue_from}: cannot be loaded into this run's network "
                                 f"({_first_line(e)})") from None
    if args.pretrained_weights:
        try:
            trainer.load_pretrained_weights(args.pretrained_weights)
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise IrisInputError(f"--pretrained_weights {args.pretrained_weights}: not weights of this architecture "
                                 f"({type(e).__name__}: {brief(e)})") from None
    if not args.val:
        trainer.run_training()
    if args.val_best:
        best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
        if not os.path.isfile(best):
            raise IrisInputError(f"--val_best: {best} not found")
        trainer.load_checkpoint(best)
    trainer.perform_actual_validation(args.npz)
    return 0


if __name__ == "__main__":
    main()
