"""`raysys bench embed`: the extraction actor's batch function against a bare forward loop.

No Ray: what an `EmbedActor` does per forward batch (`Backbone.embed`: every hidden state
requested, pooled, copied to host as float32) timed against the bare model call on the same
preprocessed tensors (`output_hidden_states=False`, nothing pooled or copied back), for a
ViT-B/16-sized vision model and a 12-layer BERT-base-sized text model built from configs with
random weights (compute does not depend on the weights). It is the GPU check of the extract
stage: it runs where torch and transformers are installed but Ray is not.

Weights load in `extract.precision` resolved for the device (`auto`: bfloat16 on cuda, float32
on CPU), as the actors would load them. Pillow is needed only to make and decode the image
half's inputs (and by transformers' image processors); without it the image half is skipped,
said so in the output and in `bench.json`, and the text half still runs.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as T

from raysys.backbones import get_backbone, resolve_precision
from raysys.backbones.base import compute_policy
from raysys.backbones.images import device_pixels
from raysys.bench.common import host_info, resolve_device, sync, write_result
from raysys.config import Config
from raysys.errors import ConfigError

Batch = dict[str, np.ndarray]

WORDS = "a the red blue green small large circle square dog cat on under left right of".split()


def _save_model(root: Path, modality: str) -> str:
    """ViT-B/16 (224 px, 12 layers, 768 wide) or BERT-base (12 layers, 768 wide), random,
    saved with its image processor or tokenizer; the `hf:` name of the folder."""
    folder = root / ("vit-b16" if modality == "image" else "bert-base")
    if modality == "image":
        T.ViTModel(T.ViTConfig(), add_pooling_layer=False).save_pretrained(folder)
        T.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
        return f"hf:{folder}"
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    tokenizer = T.BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = T.BertConfig(vocab_size=len(tokenizer))
    T.BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return f"hf:{folder}"


def _time(fn: Callable[[Batch], Any], batches: list[Batch], device: torch.device) -> float:
    """Seconds for every batch, after one untimed warm-up batch (kernels, allocator)."""
    fn(batches[0])
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        fn(batch)
    sync(device)
    return time.perf_counter() - started


def _inputs(backbone: Any, n: int, rng: np.random.Generator) -> Batch:
    """`n` raw rows as the corpus hands them over: PNG bytes, or captions with negatives."""
    ids = np.array([f"x{i}" for i in range(n)], dtype=object)
    if backbone.modality == "image":
        from PIL import Image  # here: the text half runs where Pillow is absent

        images = []
        for _ in range(n):
            buf = io.BytesIO()
            pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            images.append(buf.getvalue())
        return {"id": ids, "image": np.array(images, dtype=object)}
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(6, 20))) for _ in range(n)]
    negatives = [c.replace("red", "blue") + " left" for c in captions]
    return {
        "id": ids,
        "caption": np.array(captions, dtype=object),
        "negative": np.array(negatives, dtype=object),
    }


def _bare(backbone: Any) -> Callable[[Batch], None]:
    """The model call alone on the same tensors, under the same autocast (images: the same
    uint8 pixels, copied and normalised on the device as the actor does)."""
    model, device = backbone.model, backbone.device

    def run(batch: Batch) -> None:
        with torch.inference_mode(), backbone.autocast():
            if backbone.modality == "image":
                scale, mean, std = backbone.normalise
                x = device_pixels(batch["pixels"], device, mean, std, scale)
                model(pixel_values=backbone.cast_input(x))
            else:
                ids = np.concatenate([batch["input_ids"], batch["neg_input_ids"]])
                mask = np.concatenate([batch["attention_mask"], batch["neg_attention_mask"]])
                used = int(mask.sum(1).max()) or 1
                model(
                    input_ids=torch.from_numpy(ids[:, :used].astype(np.int64)).to(device),
                    attention_mask=torch.from_numpy(mask[:, :used].astype(np.int64)).to(device),
                )

    return run


def pillow_missing() -> str:
    """Why the image half cannot run here ("" when it can): its inputs are PNG bytes and
    transformers' image processors decode and resize with Pillow."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return "Pillow is not installed (the image inputs and processor need it)"
    return ""


def bench_embed(
    out_dir: Path,
    device: str = "auto",
    rows: int = 256,
    batch: int = 64,
    precision: str = "auto",
) -> dict[str, Any]:
    """Time both models' actor batch function and bare forward on `rows` rows in batches of
    `batch`; print one line per model, write `out_dir/bench.json` and return what it holds.
    Preprocessing is left out of both timings: the actor gets its batches preprocessed.
    `precision` is `extract.precision`, resolved for `device` as the actors resolve it."""

    dev = resolve_device(device)
    weights = resolve_precision(precision, dev.type == "cuda")
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for modality in ("image", "text"):
            skip = pillow_missing() if modality == "image" else ""
            if skip:
                results[modality] = {"skipped": skip}
                print(f"[bench] embed {modality}: skipped, {skip}", flush=True)
                continue
            name = _save_model(Path(tmp), modality)
            backbone = get_backbone(name, modality, max_text_length=64, precision=weights)
            backbone.check()
            raw = _inputs(backbone, rows, rng)
            pre = backbone.preprocess(raw)  # the CPU stage: untimed, as in the bare loop
            batches = [
                {k: v[i : i + batch] for k, v in pre.items() if k != "reject"}
                for i in range(0, rows, batch)
            ]
            inputs = [k for k in batches[0] if k != "id"]
            backbone.load(dev)
            actor_s = _time(backbone.embed, batches, dev)
            bare_s = _time(_bare(backbone), batches, dev)
            per_row = 2 if modality == "text" else 1  # text embeds caption + negative
            results[modality] = {
                "model": "ViT-B/16 (random)" if modality == "image" else "BERT-base (random)",
                "layers": len(backbone.layer_ids),
                "actor_per_s": round(rows * per_row / actor_s, 2),
                "bare_per_s": round(rows * per_row / bare_s, 2),
                "ratio": round(bare_s / actor_s, 3),
                # What one row's model input costs the object store between the CPU stage
                # and the actor (pixels or token arrays; the id left out).
                "input_bytes_per_row": sum(v[0].nbytes for k, v in pre.items() if k in inputs),
            }
            print(
                f"[bench] embed {modality}: actor batch function "
                f"{results[modality]['actor_per_s']}/s, bare forward "
                f"{results[modality]['bare_per_s']}/s, ratio {results[modality]['ratio']} "
                f"({results[modality]['layers']} layers pooled, {weights} weights, {dev})",
                flush=True,
            )
            del backbone
    host = host_info()
    bench = {
        "stage": "embed",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else host["processor"],
        "precision": weights,
        "compute": compute_policy(weights),
        "rows": rows,
        "batch_size": batch,
        **results,
        "host": host,
    }
    return write_result(out_dir, bench)


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench embed --rows N --device D`, at `extract.batch_size` and
    `extract.precision`."""
    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    bench_embed(out, args.device, args.rows, cfg.extract.batch_size, cfg.extract.precision)
