"""Per-modality intensity normalisation for Iris.

CT keeps nnU-Net's `CTNormalization` (clip to the dataset's foreground 0.5/99.5 percentiles, z-score with the
dataset's foreground mean/std), since Hounsfield units mean the same in every scan. Every other modality
(MR, PET, ...) has arbitrary units that differ per scan, so Iris clips each image to its own 2nd/98th
percentiles and z-scores it (the paper's MR/PET rule). nnU-Net's ZScoreNormalization does not clip, hence the
class below.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
    CTNormalization,
    ImageNormalization,
)


class PercentileZScoreNormalization(ImageNormalization):
    """Clip each image to its own [2nd, 98th] percentile, then z-score (inside the non-zero mask if used)."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = True
    lower_percentile = 2.0
    upper_percentile = 98.0

    def run(self, image: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
        image = image.astype(self.target_dtype, copy=False)
        mask = (seg >= 0) if (self.use_mask_for_norm and seg is not None) else None
        values = image[mask] if mask is not None else image
        if values.size == 0:
            return np.zeros_like(image)
        low, high = np.percentile(values, [self.lower_percentile, self.upper_percentile])
        values = np.clip(values, low, high)
        mean, std = float(values.mean()), float(values.std())
        if mask is not None:
            image[mask] = (values - mean) / max(std, 1e-8)
            image[~mask] = 0
        else:
            image = (values - mean) / max(std, 1e-8)
        return image.astype(self.target_dtype, copy=False)


NORMALIZERS: dict[str, type[ImageNormalization]] = {
    "CTNormalization": CTNormalization,
    "PercentileZScoreNormalization": PercentileZScoreNormalization,
}


def normalization_for_channel(channel_name: str) -> type[ImageNormalization]:
    """The normaliser for a dataset.json channel name: 'CT' -> CT, anything else -> per-image percentile z-score."""
    return CTNormalization if channel_name.strip().casefold() == "ct" else PercentileZScoreNormalization


def get_normalizer(name: str) -> type[ImageNormalization]:
    try:
        return NORMALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown normalisation scheme {name!r}; known: {', '.join(NORMALIZERS)}") from None
