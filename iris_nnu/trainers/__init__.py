"""Episodic training of Iris on nnU-Net's trainer: `IrisTrainer` and the `iris_train` command."""
