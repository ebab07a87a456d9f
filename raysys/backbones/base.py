"""The contract every frozen backbone follows, so the extract stage never special-cases one.

A backbone is split in two halves on purpose: `preprocess` runs in Ray Data's CPU tasks (decode,
resize, tokenize) and `embed` runs inside the actor that holds the model. The split keeps the
accelerator busy with matrix work only and lets both halves be tested without Ray.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

REJECT = "reject"  # per-row reason string; empty when the row is good


def layer_name(i: int, prefix: str = "") -> str:
    return f"{prefix}L{i:02d}"


def pick_device(want_gpu: bool) -> torch.device:
    return torch.device("cuda" if want_gpu and torch.cuda.is_available() else "cpu")


class Backbone(ABC):
    """A frozen model that maps a batch of inputs to pooled hidden states of every layer."""

    modality: str  # "image" or "text"
    name: str

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    @property
    @abstractmethod
    def dims(self) -> list[int]:
        """Width of each cached layer, in layer order."""

    @abstractmethod
    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """CPU half: raw rows to fixed-shape arrays, with a `reject` reason per bad row."""

    @abstractmethod
    def load(self, device: torch.device) -> None:
        """Load the weights (called once per actor, never in the CPU stage)."""

    @abstractmethod
    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Accelerator half: preprocessed arrays to `{L00: [B, d0], L01: …}` float32."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the cache manifest records: id, revision, pooling, dims, input size."""

    def autocast(self):
        """bf16 on GPU (the backbone is frozen, so its precision only affects features); fp32
        on CPU, where bf16 is slower than fp32 on most cores."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def __getstate__(self) -> dict[str, Any]:
        """Ship the recipe, not the weights: Ray pickles backbones into every task and actor,
        and each actor loads its own copy in `load`."""
        state = self.__dict__.copy()
        for heavy in ("model", "_tokenizer"):
            if heavy in state:
                state[heavy] = None
        return state
