"""torch.compile for Iris training steps, whose class count K changes every episode: recompilations and step time.

One training step = encode the reference task + segment the query + Dice/BCE loss + backward + AdamW step, for
--steps steps whose K cycles through --classes (as episodes draw 1..K_max classes). Eager and compiled networks
(same weights, same inputs) alternate step by step; reported: the compiled run's time to its first step per new K
(compilation), its steady-state median against eager's, and dynamo's count of (re)compilations. Decides
nnUNet_compile's default for Iris (see README, iris_train).

    python benchmarks/compile_speed.py [-device cpu] [--widths 16 32 64 128 256] [--patch 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iris_nnu.model import IrisNetwork, MaskedDiceBCELoss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-device", default="cpu")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, nargs="+", default=[8, 3, 8, 1, 5, 8, 2, 8])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    eager = IrisNetwork(1, features_per_stage=args.widths).to(device)
    compiled_net = IrisNetwork(1, features_per_stage=args.widths).to(device)
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net)
    loss_fn = MaskedDiceBCELoss()
    optimizers = {"eager": torch.optim.AdamW(eager.parameters()), "compiled": torch.optim.AdamW(compiled.parameters())}
    nets = {"eager": (eager, eager), "compiled": (compiled_net, compiled)}
    shape = (args.batch, 1, *(args.patch,) * 3)
    times: dict[str, list[tuple[int, float]]] = {"eager": [], "compiled": []}
    for step in range(args.steps):
        k = args.classes[step % len(args.classes)]
        reference, query = torch.randn(shape, device=device), torch.randn(shape, device=device)
        masks = (torch.rand(args.batch, k, *shape[2:], device=device) > 0.9).float()
        target = (torch.rand(args.batch, k, *shape[2:], device=device) > 0.9).float()
        valid = torch.ones(args.batch, k, dtype=torch.bool, device=device)
        for name, (plain, forward) in nets.items():
            start = time.perf_counter()
            optimizers[name].zero_grad()
            task = plain.encode_task(reference, masks)
            output = forward(query, task)
            output = output[0] if isinstance(output, list) else output
            loss_fn(output, target, valid).backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((k, time.perf_counter() - start))
        print(f"step {step}: K={k} eager {times['eager'][-1][1]:.2f} s, compiled {times['compiled'][-1][1]:.2f} s",
              file=sys.stderr)
    seen: set[int] = set()
    first = []
    for k, seconds in times["compiled"]:
        if k not in seen:
            seen.add(k)
            first.append(seconds)
    steady = {name: statistics.median(s for _, s in runs[len(set(args.classes)) * 2:]) for name, runs in times.items()}
    counters = torch._dynamo.utils.counters
    print("| | eager | compiled |\n| --- | --- | --- |")
    print(f"| steady step (median, s) | {steady['eager']:.3f} | {steady['compiled']:.3f} "
          f"({steady['eager'] / steady['compiled']:.2f}x) |")
    print(f"| first step per new K (s) | - | {' / '.join(f'{s:.1f}' for s in first)} |")
    print(f"| graphs compiled (dynamo unique_graphs) | - | {counters['stats']['unique_graphs']} |")
    print(f"\ndevice {device}, widths {args.widths}, patch {args.patch}^3, batch {args.batch}, K cycling "
          f"{args.classes}, {args.threads} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
