"""The contract every frozen backbone follows, so the extract stage never special-cases one.

A backbone is split in two halves on purpose: `preprocess` runs in Ray Data's CPU tasks (decode,
resize, tokenize) and `embed` runs inside the actor that holds the model. The split keeps the
accelerator busy with matrix work only and lets both halves be tested without Ray.

Layers are absolute hidden-state indices: 0 is the input to the first block (the embeddings),
i is block i's output. `layer_ids` (ascending) and `dims` are aligned 1:1, and `embed` returns
`{layer_name(i): [B, d]}` for exactly those ids.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from raysys.errors import BackboneError

REJECT = "reject"  # per-row reason string; empty when the row is good
POOLINGS = ("cls", "mean", "last")
# The dtypes frozen weights load in (`extract.precision`, once `auto` is resolved).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """The weight dtype `extract.precision` names: `auto` is bfloat16 where the actors hold a
    GPU (half the memory of float32, the range of float32, and what autocast computes in
    anyway) and float32 on CPU, where bf16 is slower than fp32 on most cores."""
    name = precision.strip().lower()
    if name == "auto":
        return "bfloat16" if use_gpu else "float32"
    if name not in DTYPES:
        raise BackboneError(
            f"precision {precision!r} is not one of auto, {', '.join(DTYPES)} (extract.precision)"
        )
    return name


def compute_policy(precision: str) -> str:
    """How a forward runs with weights in `precision`, for the cache key: the same weights
    give other features under another compute. On GPU, autocast in bfloat16 (float16 for
    float16 weights, which a bf16 autocast would round again on every matmul); on CPU, no
    autocast: the forward runs in the weight dtype, inputs cast to it."""
    gpu = "float16" if precision == "float16" else "bfloat16"
    return f"{precision} weights; {gpu} autocast on GPU; {precision} on CPU"


def layer_name(i: int, prefix: str = "") -> str:
    return f"{prefix}L{i:02d}"


def pick_device(want_gpu: bool) -> torch.device:
    return torch.device("cuda" if want_gpu and torch.cuda.is_available() else "cpu")


def select_layers(spec: str, n: int, what: str = "the model") -> list[int]:
    """Hidden-state indices (ascending) picked by `spec` out of `n` (indices 0..n-1).

    - `all` (or empty): every index.
    - integers, comma-separated (`0,6,-1`): absolute indices; negative ones count from the top
      as in Python, so -1 is the last layer.
    - floats in (0, 1] (`0.25,0.5,1.0`): relative depths, depth d -> floor(d * (n - 1) + 0.5)
      (round half up), so 1.0 is the last layer and one spec fits models of any depth.
    The two forms cannot be mixed. Two entries naming the same layer are an error rather than
    a silent merge: a sweep asking for four depths must get four layers or hear why not.
    """
    text = spec.strip().lower()
    if text in ("", "all"):
        return list(range(n))
    valid = f"{what} has hidden states 0..{n - 1} (or -{n}..-1 from the top)"
    items = [s.strip() for s in text.split(",")]
    if any(not s for s in items):
        raise BackboneError(f"layer spec {spec!r} has an empty entry; {valid}")
    relative = ["." in s or "e" in s for s in items]
    if any(relative) and not all(relative):
        raise BackboneError(
            f"layer spec {spec!r} mixes indices and relative depths; use integers (0,6,-1) or "
            f"depths in (0, 1] written with a point (0.5,1.0), not both"
        )
    picked: list[int] = []
    for s in items:
        try:
            value = float(s) if relative[0] else int(s)
        except ValueError:
            raise BackboneError(
                f"layer spec {spec!r}: {s!r} is not a number; use 'all', integers (0,6,-1) or "
                f"depths in (0, 1] (0.25,0.5,1.0)"
            ) from None
        if relative[0]:
            if not (0.0 < value <= 1.0):
                raise BackboneError(
                    f"layer spec {spec!r}: relative depth {s} is outside (0, 1]; {valid}"
                )
            index = math.floor(round(value * (n - 1), 9) + 0.5)  # 9: float noise
        else:
            if not -n <= value < n:
                raise BackboneError(f"layer spec {spec!r}: layer {s} is out of range; {valid}")
            index = int(value) % n
        if index in picked:
            raise BackboneError(
                f"layer spec {spec!r}: {s} names layer {index} twice (with "
                f"{items[picked.index(index)]}); {valid}, so give fewer depths or explicit indices"
            )
        picked.append(index)
    return sorted(picked)


def resolve_pooling(pooling: str, allowed: tuple[str, ...], default: str, what: str) -> str:
    """The pooling to use: `default` for an empty string; an error names the valid choices."""
    name = pooling.strip().lower() or default
    if name not in allowed:
        raise BackboneError(
            f"pooling {pooling!r} is not available for {what}; choose one of "
            f"{', '.join(allowed)} (or leave it empty for the default, {default})"
        )
    return name


def pool_tokens(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, d] -> [B, d] float32 over the tokens where `mask` is true.

    `cls` takes the first such token, `last` the last one (so both work for left and right
    padding), `mean` averages them. Masked positions are zeroed with `where`, not multiplied,
    so a NaN in a padding position can never leak into a row's vector."""
    h = h.float()
    mask = mask.bool()
    if pooling == "mean":
        total = torch.where(mask.unsqueeze(-1), h, 0.0).sum(1)
        return total / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    if pooling == "last":
        index = (mask * positions).argmax(1)
    elif pooling == "cls":
        index = mask.int().argmax(1)  # the first maximum: the first real token
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return h[torch.arange(h.shape[0], device=h.device), index]


class Backbone(ABC):
    """A frozen model that maps a batch of inputs to pooled hidden states of selected layers."""

    modality: str  # "image" or "text"
    name: str

    def __init__(self, precision: str = "float32") -> None:
        self.device = torch.device("cpu")
        if precision not in DTYPES:  # resolved before here: `auto` needs to know the device
            raise BackboneError(
                f"weight precision {precision!r} must be one of {', '.join(DTYPES)} (resolve "
                "`auto` with resolve_precision first)"
            )
        self.precision = precision

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights load in."""
        return DTYPES[self.precision]

    @property
    def compute(self) -> str:
        return compute_policy(self.precision)

    @property
    @abstractmethod
    def layer_ids(self) -> list[int]:
        """The cached hidden-state indices, ascending."""

    @property
    @abstractmethod
    def dims(self) -> list[int]:
        """Width of each cached layer, aligned with `layer_ids`."""

    @abstractmethod
    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """CPU half: raw rows to fixed-shape arrays, with a `reject` reason per bad row."""

    @abstractmethod
    def load(self, device: torch.device) -> None:
        """Load the weights (called once per actor, never in the CPU stage)."""

    @abstractmethod
    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Accelerator half: preprocessed arrays to `{L00: [B, d0], L03: …}` float32."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What keys the cache: id, source, revision, pooling, layer ids, dims, input size.
        Never a machine-specific path for a hub model, so a cache is shared across machines."""

    def check(self) -> None:
        """Fail fast in the driver, before any Ray or GPU work: the model resolves and the
        requested layers and pooling are valid. Reads configs only, never weights."""
        if len(self.layer_ids) != len(self.dims):
            raise BackboneError(
                f"{self.name}: {len(self.layer_ids)} layer ids but {len(self.dims)} dims "
                "(a bug in this backbone, not in your config)"
            )

    def param_count(self) -> int:
        """Parameters of the frozen model: the x axis of the paper's scale curves. Loads the
        weights on CPU once (in the sweep driver) and lets them go."""
        self.load(torch.device("cpu"))
        try:
            return sum(p.numel() for p in self.model.parameters())
        finally:
            del self.model

    def autocast(self):
        """bf16 on GPU (the backbone is frozen, so its precision only affects features; fp16
        for fp16 weights); none on CPU, where the forward runs in the weight dtype (see
        `cast_input`)."""
        if self.device.type == "cuda":
            half = torch.float16 if self.dtype == torch.float16 else torch.bfloat16
            return torch.autocast("cuda", dtype=half)
        return torch.autocast("cpu", enabled=False)

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """A floating input in the weight dtype: without autocast (CPU) a bf16 or fp16
        convolution or matmul refuses float32 inputs; under autocast the cast is one it would
        make anyway."""
        return x.to(self.dtype) if x.is_floating_point() else x

    def __getstate__(self) -> dict[str, Any]:
        """Ship the recipe, not the weights: Ray pickles backbones into every task and actor,
        and each actor loads its own copy in `load`; tokenizers and processors are rebuilt
        lazily where they are used."""
        state = self.__dict__.copy()
        for heavy in ("model", "_tokenizer", "_processor", "_transform"):
            if heavy in state:
                state[heavy] = None
        return state
