"""A trainer for the distributed-training test: after every step each rank appends what it saw and holds."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from iris_nnu.trainers.iris_trainer import IrisTrainer


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ProbeTrainer(IrisTrainer):
    def train_step(self, batch: dict) -> dict:
        if os.environ.get("IRIS_PROBE_FAIL_RANK") == str(self.local_rank):
            raise RuntimeError("probe: this rank dies")
        out = super().train_step(batch)
        bank = [t for member in sorted(self.memory_bank) for label in sorted(self.memory_bank[member])
                for t in self.memory_bank[member][label]]
        record = {"rank": self.local_rank, "world": torch.distributed.get_world_size() if self.is_ddp else 1,
                  "epoch": self.current_epoch, "batch": int(batch["data"].shape[0]),
                  "episode": [batch["member"], [list(k) for k in batch["keys"]], list(batch["classes"])],
                  "weights": digest(self.iris_network.parameters()), "bank": digest(bank)}
        with open(os.path.join(os.environ["IRIS_PROBE_DIR"], f"rank{self.local_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return out
