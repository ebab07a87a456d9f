"""Reporting: the results schema (`schema`), results.csv and report.md (`report`), the
sweep's PNGs (`plots`) and TensorBoard's HParams and projector (`tensorboard`)."""
