"""IrisTrainer: nnU-Net's trainer with Iris's episodic training (reference branch, masked loss, memory bank).

What stays nnU-Net's: the epoch loop, logging and progress.png, checkpoints' layout, model folder, augmentation
pipeline, deep-supervision weighting and `--c`. What is Iris's: episodes of (query, reference) pairs from one
member of a collection, a loss over valid (reference, class) pairs, AdamW with warm-up and exponential decay,
an EMA memory bank of task embeddings per (member, class), and one-shot final validation per member.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
    NonDetMultiThreadedAugmenter,
)
from batchgenerators.dataloading.single_threaded_augmenter import (
    SingleThreadedAugmenter,
)
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.helpers import dummy_context, empty_cache
from nnunetv2.utilities.plans_handling.plans_handler import (
    ConfigurationManager,
    PlansManager,
)
from torch import Tensor, autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from iris_nnu.files import write_atomic
from iris_nnu.inference.alignment import PRIOR_ALIGNMENTS
from iris_nnu.io.model_folder import load_checkpoint, load_network_weights, strip_prefixes
from iris_nnu.model import IrisNetwork, MaskedDiceBCELoss, TaskEmbedding, build_network
from iris_nnu.preprocessing.collection import Collection, load_collection
from iris_nnu.preprocessing.planner import member_spacing
from iris_nnu.trainers.episodes import AUGMENTED_P, SELF_SUPERVISED_P, EpisodicDataLoader, MemberEpisodes
from iris_nnu.trainers.validation import one_shot_validation


class WarmupExponentialLR:
    """Linear warm-up, then exponential decay to `final_fraction` of the peak at the last iteration.

    The paper's schedule (it trains 80k iterations with 2k warm-up). Stateless: the learning rate is a function of
    the global iteration, so `--c` resumes it exactly from the epoch counter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_iterations: int,
                 warmup_fraction: float = 0.025, max_warmup: int = 2000, final_fraction: float = 0.01):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.total = max(1, total_iterations)
        self.warmup = max(1, min(max_warmup, round(warmup_fraction * self.total)))
        self.final_fraction = final_fraction

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup:
            return self.peak_lr * (iteration + 1) / self.warmup
        progress = min(1.0, (iteration - self.warmup) / max(1, self.total - self.warmup))
        return self.peak_lr * self.final_fraction ** progress

    def set_iteration(self, iteration: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(iteration)

    def step(self, epoch: int | None = None) -> None:
        """nnU-Net calls this at each epoch start; the per-iteration update happens in train_step."""


class IrisTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans = dict(plans)
        plans.setdefault("continue_training", False)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:  # nnU-Net takes cuda:<global rank>: wrong across machines, and DDP runs on CPU too (gloo)
            self.device = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
        # Iris's settings are attributes, not constructor arguments: nnU-Net records the constructor's signature.
        # AdamW, not the paper's LAMB (not in torch): LAMB's layer-wise trust ratio serves batch-32+ training;
        # at nnU-Net's batch sizes (2-8) AdamW with the paper's lr, decay and warm-up is the standard equivalent.
        self.initial_lr = 2e-3
        self.weight_decay = 1e-5
        self.final_lr_fraction = 0.01  # the learning rate decays exponentially to this fraction of its peak
        self.oversample_foreground_percent = 0.67
        self.max_classes_per_episode = int(self.plans_manager.plans.get("iris", {}).get("max_classes_per_episode", 8))
        # {member name: weight} from the plans' "iris" entry (edit plans to set it); None: uniform over members
        self.member_sampling_weights: dict[str, float] | None = \
            self.plans_manager.plans.get("iris", {}).get("member_sampling_weights")
        # episode mix (trainers/episodes.py): shares of self-supervised episodes and, of the others, of augmented
        # ones; plans' "iris": {"episode_mix": {"self_supervised": p, "augmented": p}} overrides them, and its
        # "members": {member name: {"self_supervised": p, "augmented": p}} overrides them for one member
        mix = self.plans_manager.plans.get("iris", {}).get("episode_mix", {})
        self.self_supervised_p = float(mix.get("self_supervised", SELF_SUPERVISED_P))
        self.augmented_p = float(mix.get("augmented", AUGMENTED_P))
        self.member_episode_mix: dict[str, dict[str, float]] = dict(mix.get("members", {}))
        # how episodes put a query crop's voxels on its reference's position prior: "frames" (each case's body
        # frame) or "affine" (every case registered to its member's template case, as iris_predict registers a
        # query to its reference); plans' "iris": {"prior_alignment": ...} sets it
        self.prior_alignment = str(self.plans_manager.plans.get("iris", {}).get("prior_alignment", "frames"))
        if self.prior_alignment not in PRIOR_ALIGNMENTS:
            raise ValueError(f"plans' iris.prior_alignment must be one of {PRIOR_ALIGNMENTS}, got "
                             f"{self.prior_alignment!r}")
        # the share of training batches whose references' position priors are made uniform (plans' "iris":
        # {"prior_dropout": p}): with a prior in every episode the network leans on it and its appearance pathway
        # withers (measured: stage 8 without its prior 0.28 on the hippocampus, the bundled model 0.73)
        self.prior_dropout = float(self.plans_manager.plans.get("iris", {}).get("prior_dropout", 0.0))
        # plans' "iris": {"permute_axes": true}: every episode in a random voxel order (query and reference
        # together, among the patch's equal sides), for a network that does not depend on how scans are stored
        self.permute_axes = bool(self.plans_manager.plans.get("iris", {}).get("permute_axes", False))
        self.memory_bank_alpha = 0.999  # the paper's EMA factor
        self.episode_seed: int | None = None  # seed of the training episodes (None: fresh randomness)
        self.save_every = 1  # an interrupted run loses at most one epoch
        self.collection: Collection = load_collection(self.plans_manager.dataset_name, self.plans_manager.plans_name)
        # nnU-Net infers the dataset class from this folder; a multi-member collection has its data in its members
        self.preprocessed_dataset_folder = self.collection.members[0].preprocessed_folder
        self.memory_bank: dict[str, dict[int, list[torch.Tensor]]] = {}
        self.lr_schedule: WarmupExponentialLR | None = None
        self._iteration_in_epoch = 0

    # ------------------------------------------------------------------ network, loss, optimiser
    def initialize(self) -> None:
        """nnU-Net's, except that DDP wraps a CPU network too (nnU-Net passes device_ids, which only CUDA takes)."""
        if self.was_initialized:
            return
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                       self.num_input_channels, 1,
                                                       self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            self.network = DDP(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss = self._build_loss()
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """IrisNetwork from the plans; the number of outputs comes from each task, not from the plans."""
        return build_network(configuration_manager.configuration["architecture"], num_input_channels,
                             deep_supervision=enable_deep_supervision)

    @property
    def iris_network(self) -> IrisNetwork:
        """The IrisNetwork behind DDP/compile wrappers."""
        net = self.network.module if self.is_ddp else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.iris_network.set_deep_supervision(enabled)

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        if not self.enable_deep_supervision:
            return None
        stages = len(self.configuration_manager.network_arch_init_kwargs["features_per_stage"])
        return [[1 / 2**i] * 3 for i in range(stages - 1)]

    def _build_loss(self) -> nn.Module:
        loss = MaskedDiceBCELoss()
        if self.enable_deep_supervision:
            # nnU-Net's weighting: halve per scale, drop the lowest resolution, normalise
            weights = np.array([1 / 2**i for i in range(len(self._get_deep_supervision_scales()))])
            # DDP fails on a head without gradient; nnU-Net gives it a negligible weight for the same reason
            weights[-1] = 1e-6 if self.is_ddp else 0
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        self.lr_schedule = WarmupExponentialLR(optimizer, self.initial_lr,
                                               self.num_epochs * self.num_iterations_per_epoch,
                                               final_fraction=self.final_lr_fraction)
        return optimizer, self.lr_schedule

    # ------------------------------------------------------------------ data
    def do_split(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Training and validation cases per member, from the collection's splits_final.json."""
        if self.fold == "all":
            every = {m.name: list(m.cases) for m in self.collection.members}
            return every, every
        return self.collection.fold_cases(self.fold, "train"), self.collection.fold_cases(self.fold, "val")

    def _members_for(self, query_cases: dict[str, list[str]], reference_cases: dict[str, list[str]]
                     ) -> list[MemberEpisodes]:
        weights = self.member_sampling_weights or {}
        # {member name: [label values]} of the plans' "iris" entry: structures no episode asks for, so that their
        # one-shot Dice measures structures the model never trained on
        held_out = self.plans_manager.plans.get("iris", {}).get("held_out_classes", {})
        def share(name: str, kind: str) -> float | None:
            value = self.member_episode_mix.get(name, {}).get(kind)
            return None if value is None else float(value)

        return [MemberEpisodes(m.name, m.preprocessed_folder, m.labels, query_cases[m.name],
                               reference_cases[m.name], float(weights.get(m.name, 1.0)),
                               tuple(int(v) for v in held_out.get(m.name, ())),
                               share(m.name, "self_supervised"), share(m.name, "augmented"),
                               (member_spacing(self.plans_manager.plans, m.name),) * 3
                               if self.prior_alignment == "affine" else None)
                for m in self.collection.members if query_cases[m.name] and reference_cases[m.name]]

    def get_dataloaders(self):
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # the axes the loader mirrors query and reference together on; inference's mirrored TTA flips both the same
        # way (flipping the query alone, as nnU-Net does, would vote left/right classes onto the wrong side)
        self.inference_allowed_mirroring_axes = mirror_axes
        use_mask = self.configuration_manager.use_mask_for_norm
        # mirroring is applied to query and reference together in the loader, so it is left out here
        query_transforms = self.get_training_transforms(patch_size, rotation, ds_scales, None, dummy_2d, use_mask)
        reference_transforms = self.get_training_transforms(patch_size, rotation, None, None, dummy_2d, use_mask)
        val_query_transforms = self.get_validation_transforms(ds_scales)
        val_reference_transforms = self.get_validation_transforms(None)
        train, val = self.do_split()
        common = dict(batch_size=self.batch_size, max_classes=self.max_classes_per_episode,
                      position_grid=self.iris_network.position_grid)
        # each rank draws its own episodes (nnU-Net's loaders are random per process; ours are seeded)
        rank_seed = 1000 * self.local_rank
        dl_train = EpisodicDataLoader(self._members_for(train, train), initial_patch_size=initial_patch_size,
                                      patch_size=patch_size, query_transforms=query_transforms,
                                      reference_transforms=reference_transforms, mirror_axes=mirror_axes,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      seed=None if self.episode_seed is None else self.episode_seed + rank_seed,
                                      weak_reference_transforms=val_reference_transforms,
                                      self_supervised_p=self.self_supervised_p, augmented_p=self.augmented_p,
                                      permute_axes=self.permute_axes, **common)
        # validation episodes: queries from the validation cases, references from the training cases
        dl_val = EpisodicDataLoader(self._members_for(val, train), initial_patch_size=patch_size,
                                    patch_size=patch_size, query_transforms=val_query_transforms,
                                    reference_transforms=val_reference_transforms, seed=12345 + rank_seed,
                                    oversample_foreground_percent=1.0, **common)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(dl_train, None), SingleThreadedAugmenter(dl_val, None)
        pin = self.device.type == "cuda"
        return (NonDetMultiThreadedAugmenter(dl_train, None, processes, max(6, processes // 2), None, pin, 0.002),
                NonDetMultiThreadedAugmenter(dl_val, None, max(1, processes // 2), max(3, processes // 4), None,
                                             pin, 0.002))

    # ------------------------------------------------------------------ training loop hooks
    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        os.makedirs(self.output_folder, exist_ok=True)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        self.print_plans()
        empty_cache(self.device)
        if self.local_rank == 0:
            # plans, dataset.json and the manifest at the trainer level, as nnU-Net keeps them for inference
            save_json(self.plans_manager.plans, os.path.join(self.output_folder_base, "plans.json"), sort_keys=False)
            save_json(self.dataset_json, os.path.join(self.output_folder_base, "dataset.json"), sort_keys=False)
            shutil.copyfile(os.path.join(self.collection.folder, "manifest.json"),
                            os.path.join(self.output_folder_base, "manifest.json"))
            self._save_debug_information()

    def plot_network_architecture(self) -> None:
        """Not available: the network's forward needs a task (and hiddenlayer is not a dependency)."""

    def on_train_epoch_start(self) -> None:
        self._iteration_in_epoch = 0
        self.lr_schedule.set_iteration(self.current_epoch * self.num_iterations_per_epoch)
        super().on_train_epoch_start()

    def _episode_to_device(self, batch: dict):
        query = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        reference = batch["reference"].to(self.device, non_blocking=True)
        masks = batch["reference_masks"].to(self.device, non_blocking=True)
        return query, target, reference, masks, batch["present"].to(self.device)

    def _episode_positions(self, batch: dict) -> tuple[Tensor | None, Tensor | None]:
        """The episode's query coordinates and reference position priors on the device (None where absent)."""
        move = lambda key: None if batch.get(key) is None else batch[key].to(self.device, non_blocking=True)
        return move("coordinates"), move("reference_positions")

    def _episode_forward(self, batch: dict, uniform_prior: bool = False,
                         ) -> tuple[TaskEmbedding, Tensor | list[Tensor], Tensor | list[Tensor], Tensor, Tensor]:
        """Encode the episode's references, segment its queries: (task, output, target, present, loss).
        `uniform_prior`: the references' position priors say nothing (the prior's weight still gets a gradient, so
        DDP ranks that differ here stay in step)."""
        query, target, reference, masks, present = self._episode_to_device(batch)
        coordinates, positions = self._episode_positions(batch)
        if uniform_prior and positions is not None:
            positions = torch.ones_like(positions)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            task = self.iris_network.encode_task(reference, masks, batch["classes"], positions)
            output = self.network(query, task, coordinates)
            deep = isinstance(output, list)
            loss = self.loss(output, target, [present] * len(output) if deep else present)
        return task, output, target, present, loss

    def train_step(self, batch: dict) -> dict:
        iteration = self.current_epoch * self.num_iterations_per_epoch + self._iteration_in_epoch
        self.lr_schedule.set_iteration(iteration)
        self._iteration_in_epoch += 1
        self.optimizer.zero_grad(set_to_none=True)
        # drawn from the global iteration, as the learning rate: --c resumes the same draws
        seed = None if self.episode_seed is None else (self.episode_seed, iteration)
        uniform_prior = self.prior_dropout > 0 and np.random.default_rng(seed).random() < self.prior_dropout
        task, _, _, present, loss = self._episode_forward(batch, uniform_prior)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.update_memory_bank(batch["member"], task, present)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        _, output, target, present, loss = self._episode_forward(batch)
        if isinstance(output, list):
            output, target = output[0], target[0]
        predicted = (output > 0).float().flatten(2)
        target = target.float().flatten(2)
        valid = present.float()
        tp = ((predicted * target).sum(2) * valid).sum()
        fp = ((predicted * (1 - target)).sum(2) * valid).sum()
        fn = (((1 - predicted) * target).sum(2) * valid).sum()
        return {"loss": float(loss.detach().cpu()), "member": batch["member"],
                "tp": float(tp.cpu()), "fp": float(fp.cpu()), "fn": float(fn.cpu())}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """Pseudo Dice per member (voxels pooled over its episodes); the mean over members drives checkpoint_best."""
        if self.is_ddp:  # every rank's episodes, so that every rank logs and decides alike
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, val_outputs)
            val_outputs = [o for outputs in gathered for o in outputs]
        dice = []
        for m in self.collection.members:
            outs = [o for o in val_outputs if o["member"] == m.name]
            tp, fp, fn = (sum(o[key] for o in outs) for key in ("tp", "fp", "fn"))
            dice.append(2 * tp / (2 * tp + fp + fn) if outs and (2 * tp + fp + fn) > 0 else float("nan"))
        mean = float(np.nanmean(dice)) if not all(math.isnan(d) for d in dice) else 0.0
        self.logger.log("mean_fg_dice", mean, self.current_epoch)
        self.logger.log("dice_per_class_or_region", dice, self.current_epoch)
        self.logger.log("val_losses", float(np.mean([o["loss"] for o in val_outputs])), self.current_epoch)

    # ------------------------------------------------------------------ memory bank
    @torch.no_grad()
    def update_memory_bank(self, member: str, task: TaskEmbedding, present: torch.Tensor) -> None:
        """EMA of each (member, class) task embedding over the references where the class was present. In a
        distributed run every rank applies every rank's update in rank order, so the banks stay identical."""
        # negative labels are tasks made up for one episode (task augmentation, supervoxels): not a (member, class)
        updates = [(member, int(label), [t[present[:, k], k].float().mean(0).detach().cpu() for t in task.tokens])
                   for k, label in enumerate(task.classes) if label >= 0 and bool(present[:, k].any())]
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, updates)
            updates = [u for rank_updates in gathered for u in rank_updates]
        a = self.memory_bank_alpha
        for member_name, label, new in updates:
            bank = self.memory_bank.setdefault(member_name, {})
            old = bank.get(label)
            bank[label] = new if old is None else [a * o + (1 - a) * n for o, n in zip(old, new)]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the memory bank and Iris settings, written atomically (temp name, rename)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = {
            "network_weights": self.iris_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "iris_memory_bank": {member: {str(label): tokens for label, tokens in bank.items()}
                                 for member, bank in self.memory_bank.items()},
            "iris_settings": {"num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                              "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                              "memory_bank_alpha": self.memory_bank_alpha,
                              "max_classes_per_episode": self.max_classes_per_episode},
        }
        write_atomic(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_pretrained_weights(self, path: str) -> None:
        """Start from another run's network weights (nnU-Net's -pretrained_weights; the file is loaded with
        weights_only=True, which nnU-Net's loader does not do); the architecture must be the same."""
        if not self.was_initialized:
            self.initialize()
        missing, unexpected = self.iris_network.load_state_dict(load_network_weights(path), strict=False)
        # a model from before position priors starts with the prior's default weight; nothing else may differ
        if [k for k in missing if k != "position_weight"] or unexpected:
            raise RuntimeError(f"{path}: weights of another architecture (missing {missing}, unexpected {unexpected})")
        if missing:
            self.print_to_log_file(f"{path} has no position weight (an older model): it starts at its default")

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        # ours: nnU-Net's unpickles the file with weights_only=False (and its dict form is broken in 2.8.1)
        checkpoint = load_checkpoint(filename_or_checkpoint)
        if not self.was_initialized:
            self.initialize()
        self.iris_network.load_state_dict(strip_prefixes(checkpoint["network_weights"]))
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.memory_bank = {member: {int(label): tokens for label, tokens in bank.items()}
                            for member, bank in checkpoint.get("iris_memory_bank", {}).items()}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.is_ddp:  # one process validates (whole cases, sliding window); the others wait for it
            if self.local_rank == 0:
                self._one_shot_validation(save_probabilities)
            dist.barrier()
        else:
            self._one_shot_validation(save_probabilities)

    def _one_shot_validation(self, save_probabilities: bool) -> None:
        start = time()
        # in eval mode without deep supervision, then restores both
        summary = one_shot_validation(self, save_probabilities=save_probabilities)
        self.print_to_log_file(f"one-shot validation ({time() - start:.0f} s): "
                               + json.dumps({k: round(v, 4) for k, v in summary.items()}))


class IrisTrainer_FineTune(IrisTrainer):
    """IrisTrainer at a tenth of its peak learning rate, decaying to 2e-5 (IrisTrainer's last): to continue a trained
    model with -pretrained_weights, whose fresh schedule would otherwise restart at IrisTrainer's peak. Measured
    continuing stage 8 (43 epochs): every member within 0.02 calibrated; the brains at 0.5 fell 0.14, as with a restart
    at the peak (README Results)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 2e-4
        self.final_lr_fraction = 0.1
