"""What training and inference both read and write: checkpoints and model folders."""
