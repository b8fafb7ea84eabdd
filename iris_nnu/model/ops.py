"""Numerical helpers of IrisNetwork: 3D pixel (un)shuffle, the exact full-resolution masked average, head counts
and a Conv3d routed to oneDNN on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pixel_shuffle_3d(x: Tensor, r: int) -> Tensor:
    """(B, C*r^3, X, Y, Z) -> (B, C, rX, rY, rZ); channel index c*r^3 + i*r^2 + j*r + k -> offset (i, j, k)."""
    if r == 1:
        return x
    b, c, nx, ny, nz = x.shape
    x = x.view(b, c // r**3, r, r, r, nx, ny, nz).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // r**3, nx * r, ny * r, nz * r)


def pixel_unshuffle_3d(x: Tensor, r: int) -> Tensor:
    """Inverse of pixel_shuffle_3d: (B, C, rX, rY, rZ) -> (B, C*r^3, X, Y, Z)."""
    if r == 1:
        return x
    b, c, nx, ny, nz = x.shape
    x = x.view(b, c, nx // r, r, ny // r, r, nz // r, r).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r**3, nx // r, ny // r, nz // r)


def _interp_matrix(n_low: int, n_full: int, like: Tensor) -> Tensor:
    """(n_low, n_full): row i is the 1D linear up-sampling (align_corners=False) of the unit vector e_i."""
    eye = torch.eye(n_low, device=like.device, dtype=like.dtype).unsqueeze(1)
    return F.interpolate(eye, size=n_full, mode="linear", align_corners=False).squeeze(1)


def full_res_masked_average(feats: Tensor, masks: Tensor, eps: float = 1e-6) -> Tensor:
    """sum(up(F) * m) / (sum(m) + eps) per class, up = trilinear up-sampling of F (B,C,x,y,z) to the masks' size.

    Up-sampling is linear and separable, so <up(F), m> = <F, up^T(m)>: the masks are pulled down with the
    transposed 1D interpolation matrices instead of materialising up(F) (C*N) or F*m (K*C*N). Exact, O(K*N)."""
    with torch.autocast(feats.device.type, enabled=False):  # sums over millions of voxels overflow fp16
        feats, m = feats.float(), masks.float()
        ax, ay, az = (_interp_matrix(lo, hi, feats) for lo, hi in zip(feats.shape[2:], masks.shape[2:]))
        pulled = torch.einsum("bkXYZ,xX->bkxYZ", m, ax)
        pulled = torch.einsum("bkxYZ,yY->bkxyZ", pulled, ay)
        pulled = torch.einsum("bkxyZ,zZ->bkxyz", pulled, az)
        pooled = torch.bmm(pulled.flatten(2), feats.flatten(2).transpose(1, 2))  # (B, K, C)
        return pooled / (m.flatten(2).sum(-1, keepdim=True) + eps)


def attention_heads_for(dim: int, wanted: int) -> int:
    """Largest head count <= wanted that divides dim (so channels % heads == 0 at every scale)."""
    return max(h for h in range(1, max(1, min(wanted, dim)) + 1) if dim % h == 0)



class Conv3d(nn.Conv3d):
    """nn.Conv3d that sends CPU float32 input to oneDNN. PyTorch picks the backend from (B, C, X, Y) only, so
    batch-1 3D convs with C*X*Y <= 20480 fall to the im2col kernel, measured 5-10x slower at 16^3-32^3."""

    def forward(self, x: Tensor) -> Tensor:
        # under torch.compile inductor picks the convolution itself (and cannot trace mkldnn_convolution); under
        # autocast the stock path casts to bfloat16, which PyTorch always sends to oneDNN
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 \
                and self.padding_mode == "zeros" and torch.backends.mkldnn.is_available() \
                and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling() \
                and not torch.is_autocast_enabled("cpu"):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)
