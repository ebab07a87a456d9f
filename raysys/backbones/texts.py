"""The text half every language family shares: which rows are bad, and captions plus their hard
negatives embedded in one forward, so each family only says how to tokenize and encode."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from raysys.backbones.base import REJECT, Backbone, layer_name

NEG = "neg_"


class PairedText(Backbone):
    """Rows `{id, caption, negative}`; a row whose caption or negative is missing or blank is
    rejected (NegCon and Spread need both)."""

    modality = "text"

    @abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Fixed-shape token arrays (same keys and shapes for every batch)."""

    @abstractmethod
    def encode(self, tokens: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Pooled float32 `[N, d]` per cached layer, in `layer_ids` order."""

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokenize captions and their hard negatives, padded to a fixed length so Ray Data
        blocks hold plain fixed-shape arrays."""
        reasons = np.full(len(batch["id"]), "", dtype=object)
        texts: dict[str, list[str]] = {"caption": [], "negative": []}
        for column, values in texts.items():
            for i, value in enumerate(batch[column]):
                if not isinstance(value, str) or not value.strip():
                    reasons[i] = reasons[i] or f"empty or non-text {column}"
                    value = ""
                values.append(value)
        out = {"id": batch["id"], REJECT: reasons}
        out |= self.tokenize(texts["caption"])
        out |= {NEG + k: v for k, v in self.tokenize(texts["negative"]).items()}
        return out

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward over captions and negatives stacked, then split back apart."""
        keys = [k for k in batch if NEG + k in batch]
        n = len(batch[keys[0]])
        tokens = {
            k: torch.from_numpy(np.concatenate([batch[k], batch[NEG + k]]).astype(np.int64)).to(
                self.device
            )
            for k in keys
        }
        out: dict[str, np.ndarray] = {}
        for i, h in zip(self.layer_ids, self.encode(tokens), strict=True):
            h = h.float().cpu().numpy()
            out[layer_name(i)] = h[:n]
            out[layer_name(i, NEG)] = h[n:]
        return out
