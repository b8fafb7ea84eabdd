"""The torch device a command runs on, from its -device flag."""
from __future__ import annotations

import argparse

import torch

from iris_nnu.errors import IrisInputError


def resolve_device(name: str | None) -> torch.device:
    """cpu | cuda | mps, or None for cuda when available, else cpu; an unavailable device is a clear error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IrisInputError(f"-device cuda: CUDA is not available to this torch build ({torch.__version__}); "
                             f"use -device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise IrisInputError("-device mps: Apple MPS is not available here; use -device cpu")
    return torch.device(name)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The -device option every command shares (nnU-Net's name); None = cuda when available, else cpu."""
    parser.add_argument("-device", choices=("cpu", "cuda", "mps"), default=None,
                        help="device to run on; default: cuda if available, else cpu")
