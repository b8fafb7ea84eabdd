"""Iris query-decoding speed vs K, side by side with plain nnU-Net networks of the same widths and patch.

Targets: Iris K=16 at most 1.3x Iris K=1; the Iris query pass at most 1.3x the plain nnU-Net network.
Times are the minimum over interleaved repeats (robust to other load on a shared machine), batch 1, eval mode,
inference_mode. The nnU-Net networks (dynamic_network_architectures) are timed twice on CPU: stock, and with
their Conv3d layers sent to oneDNN like Iris's (PyTorch's own choice sends small batch-1 3D convs to a slow
kernel), so the ratio compares architectures, not conv backends.

On CPU a window as iris_predict runs it (without the position prior, which it adds once per voxel afterwards) is also
timed in float32 and under bfloat16 autocast (iris_predict --precision bfloat16, the default on CPUs with AMX tiles):
column "bf16/fp32".

Run: python benchmarks/model_speed.py [--widths 16,32,64,128,256] [--patch 64,64,64] [--ks 1,4,16]
The bundled model's windows: --widths 8,16,32,64,128 --patch 32,32,32 --ks 2,5,85
On a machine shared with other jobs: --threads 1 --clock cpu.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from iris_nnu.model import IrisArchitecture, IrisNetwork, count_parameters  # noqa: E402
from iris_nnu.inference.segmenter import window_autocast  # noqa: E402
from iris_nnu.model.ops import Conv3d  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def nnunet_networks(widths: tuple[int, ...], blocks: int, num_classes: int) -> dict[str, nn.Module]:
    """nnU-Net's PlainConvUNet and ResidualEncoderUNet with these widths (stride-2 stages, IN, LeakyReLU)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    n = len(widths)
    common = dict(input_channels=1, n_stages=n, features_per_stage=widths, conv_op=nn.Conv3d, kernel_sizes=3,
                  strides=[1] + [2] * (n - 1), num_classes=num_classes, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    return {"PlainConvUNet": PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **common),
            "ResEncUNet": ResidualEncoderUNet(n_blocks_per_stage=blocks, n_conv_per_stage_decoder=2, **common)}


def with_onednn_convs(net: nn.Module) -> nn.Module:
    """The same network with its Conv3d layers routed like Iris's (no new weights)."""
    for m in net.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = Conv3d
    return net


def _under(context, fn, *args):
    with context:
        return fn(*args)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(device: torch.device, widths: tuple[int, ...], blocks: int, patch: tuple[int, ...],
          ks: tuple[int, ...], repeats: int, clock: str = "wall") -> None:
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    iris = IrisNetwork(1, widths, blocks).to(device).eval()
    query, ref = torch.randn(1, 1, *patch, device=device), torch.randn(1, 1, *patch, device=device)
    fns = {}
    for k in ks:
        masks = (torch.rand(1, k, *patch, device=device) > 0.9).float()
        with torch.inference_mode():
            task = iris.encode_task(ref, masks)
        fns[k, "encode"] = lambda masks=masks: iris.encode_task(ref, masks)
        fns[k, "iris"] = lambda task=task: iris(query, task)
        if device.type == "cpu":  # a window as iris_predict runs it (the prior added after the windows), in both
            window_task = dataclasses.replace(task, positions=None)  # precisions (bfloat16: the default on AMX CPUs)
            with torch.inference_mode():  # the task-only first step, once per query
                attended = iris.attended_task_tokens(window_task)
                attended_bf16 = _under(window_autocast("bfloat16", device), iris.attended_task_tokens, window_task)
            fns[k, "window"] = lambda task=window_task, a=attended: iris(query, task, attended_tokens=a)
            fns[k, "window bf16"] = lambda task=window_task, a=attended_bf16: _under(
                window_autocast("bfloat16", device), lambda: iris(query, task, attended_tokens=a))
        for name, net in nnunet_networks(widths, blocks, k + 1).items():
            fns[k, name + " stock"] = lambda net=net.to(device).eval(): net(query)
        if device.type == "cpu":  # separate instances: with_onednn_convs changes the modules' class
            for name, net in nnunet_networks(widths, blocks, k + 1).items():
                fns[k, name] = lambda net=with_onednn_convs(net.eval()): net(query)
    best = {key: float("inf") for key in fns}
    with torch.inference_mode():
        for r in range(repeats + 1):  # all rows interleaved in every round; the first round warms up
            for key, fn in fns.items():
                sync(device)
                t0 = now()
                fn()
                sync(device)
                if r:
                    best[key] = min(best[key], now() - t0)
    rows = [(k, {name: t for (kk, name), t in best.items() if kk == k}) for k in ks]
    if device.type != "cpu":  # no backend quirk to correct for: stock is the comparison
        rows = [(k, {**b, "PlainConvUNet": b["PlainConvUNet stock"], "ResEncUNet": b["ResEncUNet stock"]})
                for k, b in rows]
    print(f"\n{device} ({torch.get_num_threads()} threads), widths {widths}, {blocks} blocks/stage, "
          f"patch {patch}, batch 1; {'process CPU' if now is time.process_time else 'wall'} seconds, min of {repeats}")
    cols = ["K", "encode_task", "Iris query", "vs K=" + str(ks[0]), "PlainConvUNet", "Iris/Plain",
            "ResEncUNet", "Iris/ResEnc", "Plain stock", "ResEnc stock"]
    if device.type == "cpu":
        cols += ["window fp32", "window bf16", "bf16/fp32"]
    print(" | ".join(cols) + "\n" + "-" * (sum(map(len, cols)) + 3 * len(cols)))
    t1 = rows[0][1]["iris"]
    for k, b in rows:
        vals = [str(k), f"{b['encode']:.3f}", f"{b['iris']:.3f}", f"{b['iris'] / t1:.2f}x",
                f"{b['PlainConvUNet']:.3f}", f"{b['iris'] / b['PlainConvUNet']:.2f}x",
                f"{b['ResEncUNet']:.3f}", f"{b['iris'] / b['ResEncUNet']:.2f}x",
                f"{b['PlainConvUNet stock']:.3f}", f"{b['ResEncUNet stock']:.3f}"]
        if "window bf16" in b:
            vals += [f"{b['window']:.3f}", f"{b['window bf16']:.3f}", f"{b['window bf16'] / b['window']:.2f}x"]
        print(" | ".join(v.rjust(len(c)) for v, c in zip(vals, cols)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=_ints, default=(16, 32, 64, 128, 256), help="CPU config widths")
    ap.add_argument("--patch", type=_ints, default=(64, 64, 64), help="CPU config (planner) patch")
    ap.add_argument("--gpu-widths", type=_ints, default=(32, 64, 128, 256, 512), help="default GPU config")
    ap.add_argument("--gpu-patch", type=_ints, default=(128, 128, 128), help="GPU config patch (GPU runs only)")
    ap.add_argument("--blocks", type=int, default=2, help="residual blocks per stage")
    ap.add_argument("--ks", type=_ints, default=(1, 4, 16), help="numbers of classes K")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, steadier on a shared machine (use with --threads 1)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU runs even if CUDA is available")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    for name, widths in (("GPU config", args.gpu_widths), ("CPU config", args.widths)):
        # position_grid given: count_parameters reads plans, where an absent one means none (plans before the prior)
        kw = dict(features_per_stage=widths, blocks_per_stage=args.blocks, position_grid=IrisArchitecture.position_grid)
        n = sum(p.numel() for p in IrisNetwork(1, **kw).parameters())
        assert n == count_parameters(kw, 1)
        print(f"{name}: widths {widths}, {args.blocks} blocks/stage: {n:,} parameters ({n / 1e6:.2f} M)")

    bench(torch.device("cpu"), args.widths, args.blocks, args.patch, args.ks, args.repeats, args.clock)
    if torch.cuda.is_available() and not args.no_gpu:
        cuda = torch.device("cuda")
        bench(cuda, args.widths, args.blocks, args.patch, args.ks, args.repeats)
        bench(cuda, args.gpu_widths, args.blocks, args.gpu_patch, args.ks, args.repeats)


if __name__ == "__main__":
    main()
