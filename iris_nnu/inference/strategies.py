"""Iris's inference strategies beyond one reference's embedding (Iris, "Inference strategies"), as functions.

- ensemble: per class, the mean of the references' embeddings where the class is present (TaskEmbedding.mean);
- retrieval: `select_references` keeps per class the references most similar to the query's own embedding;
- tune: `tune_task` optimises the task tokens on the reference crops, the network frozen.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from iris_nnu.inference.references import Crop
from iris_nnu.model import IrisNetwork, TaskEmbedding
from iris_nnu.model.loss import MaskedDiceBCELoss

STRATEGIES = ("oneshot", "ensemble", "retrieval", "tune")
DEFAULT_TUNE_STEPS = 20
DEFAULT_TUNE_LR = 1e-2  # Adam on the tokens; the paper gives no value: a few steps should move them noticeably


def cosine_similarity(a: TaskEmbedding, a_index: tuple[int, int], b: TaskEmbedding, b_index: tuple[int, int]) -> float:
    """Cosine similarity of two classes' full embeddings (all scales, foreground and context tokens)."""
    va = torch.cat([t[a_index].flatten().float() for t in a.tokens])
    vb = torch.cat([t[b_index].flatten().float() for t in b.tokens]).to(va.device)
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))


def select_references(pool: TaskEmbedding, query: TaskEmbedding, top_k: int = 1,
                      ) -> tuple[TaskEmbedding, dict[int, list[int]]]:
    """Object-level retrieval: per class the query predicted, keep the `top_k` pool references most similar to
    the query's own embedding; other classes keep every reference. Returns the averaged task and the picks."""
    keep = pool.present.clone()
    picks: dict[int, list[int]] = {}
    for k, value in enumerate(pool.classes):
        if value not in query.classes:
            continue
        q = query.classes.index(value)
        candidates = [b for b in range(pool.batch_size) if bool(pool.present[b, k])]
        scores = [cosine_similarity(query, (0, q), pool, (b, k)) for b in candidates]
        chosen = [candidates[i] for i in np.argsort(scores)[::-1][:top_k]]
        keep[:, k] = False
        keep[chosen, k] = True
        picks[value] = sorted(chosen)
    return dataclasses.replace(pool, present=keep).mean(), picks


def tune_task(network: IrisNetwork, task: TaskEmbedding, crops: Sequence[Sequence[Crop]], present: torch.Tensor,
              steps: int = DEFAULT_TUNE_STEPS, lr: float = DEFAULT_TUNE_LR, position_prior: bool = True,
              device: torch.device | str = "cpu") -> tuple[TaskEmbedding, list[float]]:
    """In-context tuning: `network` frozen, Adam on `task`'s tokens, Dice + BCE on the reference crops (per reference
    r, `crops[r]`, whose labels index the task's classes; `present[r]`: the classes reference r holds). Returns the
    tuned task (no mirrored tokens: they would be of the untuned references) and the loss at each step (the first
    untuned)."""
    if steps < 0 or lr <= 0:
        raise ValueError(f"tune needs steps >= 0 and lr > 0, got {steps}, {lr}")
    positions = task.positions if position_prior else None
    items = []
    for r, reference_crops in enumerate(crops):
        valid = present[r].to(device)[None]  # a reference says nothing of its absent classes
        for crop in reference_crops:
            target = np.stack([crop.labels == i for i in range(1, task.num_classes + 1)])
            coordinates = None if crop.frame is None else \
                crop.frame.coordinates(crop.origin, crop.labels.shape, device)[None]
            items.append((torch.from_numpy(crop.image)[None].to(device),
                          torch.from_numpy(target)[None].to(device, torch.float32), valid, coordinates))
    params = [torch.nn.Parameter(t.detach().clone().to(device)) for t in task.tokens]
    optimizer = torch.optim.Adam(params, lr=lr)
    loss_fn = MaskedDiceBCELoss()
    frozen = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        network.check_task(task)
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with torch.set_grad_enabled(step < steps):
                for image, target, valid, coordinates in items:
                    current = TaskEmbedding(params, task.classes, task.present, task.model_id, positions)
                    loss = loss_fn(network(image, current, coordinates, check_model=False), target, valid) / len(items)
                    if step < steps:
                        loss.backward()
                    total += loss.item()
            losses.append(total)
            if step < steps:
                optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return dataclasses.replace(task, tokens=[p.detach() for p in params], mirrored=None), losses
