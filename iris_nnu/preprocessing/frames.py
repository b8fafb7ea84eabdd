"""Where a preprocessed scan's body lies (its ScanFrame, the position prior's frame), as training and inference
both define it, and where a scan's properties keep it."""
from __future__ import annotations

import numpy as np

from iris_nnu.model.position import ScanFrame

# properties key of a preprocessed scan's ScanFrame (as a dict)
SCAN_FRAME_KEY = "iris_scan_frame"


def body_frame(seg: np.ndarray) -> ScanFrame:
    """The frame of a preprocessed scan from its (1, X, Y, Z) label map: nnU-Net marks voxels outside the non-zero
    mask -1, also in the label map its preprocessor makes for an image alone."""
    return ScanFrame.of(np.asarray(seg)[0] >= 0)


def scan_frame(properties: dict) -> ScanFrame:
    """The frame our preprocessing recorded in a scan's properties (inference's RunPreprocessing)."""
    if SCAN_FRAME_KEY not in properties:
        raise ValueError(f"no scan frame in the properties ({SCAN_FRAME_KEY!r}): preprocess with iris-nnu's "
                         f"preprocessing, or give the frame")
    return ScanFrame.from_dict(properties[SCAN_FRAME_KEY])
