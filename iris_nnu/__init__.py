"""iris-nnu: in-context 3D medical image segmentation (Iris) built on nnU-Net v2."""

__version__ = "0.1.0"
