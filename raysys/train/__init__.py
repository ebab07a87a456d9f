"""Training: the step in plain torch (`step`), the Ray Train worker loop (`worker`) and the
driver that fits a `TorchTrainer` (`driver`). Importing this package imports no Ray."""
