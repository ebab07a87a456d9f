"""`raysys bench embed`: the extraction actor's batch function against a bare forward loop.

No Ray: what an `EmbedActor` does per forward batch (`Backbone.embed`: every hidden state
requested, pooled, copied to host as float32) timed against the bare model call on the same
preprocessed tensors (`output_hidden_states=False`, nothing pooled or copied back), for a
ViT-B/16-sized vision model and a 12-layer BERT-base-sized text model built from configs with
random weights (compute does not depend on the weights). It is the GPU check of the extract
stage: it runs where torch and transformers are installed but Ray is not.
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

from raysys.backbones import get_backbone
from raysys.bench.common import host_info, resolve_device, sync, write_result
from raysys.config import Config
from raysys.errors import ConfigError

Batch = dict[str, np.ndarray]

WORDS = "a the red blue green small large circle square dog cat on under left right of".split()


def _save_models(root: Path) -> tuple[str, str]:
    """ViT-B/16 (224 px, 12 layers, 768 wide) and BERT-base (12 layers, 768 wide), random."""
    vision, text = root / "vit-b16", root / "bert-base"
    T.ViTModel(T.ViTConfig(), add_pooling_layer=False).save_pretrained(vision)
    T.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vision)
    text.mkdir(parents=True)
    (text / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]))
    tokenizer = T.BertTokenizer(str(text / "vocab.txt"))
    tokenizer.save_pretrained(text)
    T.BertModel(T.BertConfig(vocab_size=len(tokenizer)), add_pooling_layer=False).save_pretrained(
        text
    )
    return f"hf:{vision}", f"hf:{text}"


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

    from PIL import Image

    ids = np.array([f"x{i}" for i in range(n)], dtype=object)
    if backbone.modality == "image":
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
    """The model call alone on the same tensors, under the same autocast."""
    model, device = backbone.model, backbone.device

    def run(batch: Batch) -> None:
        with torch.inference_mode(), backbone.autocast():
            if backbone.modality == "image":
                x = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(device)
                model(pixel_values=x)
            else:
                ids = np.concatenate([batch["input_ids"], batch["neg_input_ids"]])
                mask = np.concatenate([batch["attention_mask"], batch["neg_attention_mask"]])
                used = int(mask.sum(1).max()) or 1
                model(
                    input_ids=torch.from_numpy(ids[:, :used].astype(np.int64)).to(device),
                    attention_mask=torch.from_numpy(mask[:, :used].astype(np.int64)).to(device),
                )

    return run


def bench_embed(
    out_dir: Path, device: str = "auto", rows: int = 256, batch: int = 64
) -> dict[str, Any]:
    """Time both models' actor batch function and bare forward on `rows` rows in batches of
    `batch`; print one line per model, write `out_dir/bench.json` and return what it holds.
    Preprocessing is left out of both timings: the actor gets its batches preprocessed."""

    dev = resolve_device(device)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = dict(zip(("image", "text"), _save_models(Path(tmp)), strict=True))
        for modality, name in names.items():
            backbone = get_backbone(name, modality, max_text_length=64)
            backbone.check()
            raw = _inputs(backbone, rows, rng)
            pre = backbone.preprocess(raw)  # the CPU stage: untimed, as in the bare loop
            batches = [
                {k: v[i : i + batch] for k, v in pre.items() if k != "reject"}
                for i in range(0, rows, batch)
            ]
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
            }
            print(
                f"[bench] embed {modality}: actor batch function "
                f"{results[modality]['actor_per_s']}/s, bare forward "
                f"{results[modality]['bare_per_s']}/s, ratio {results[modality]['ratio']} "
                f"({results[modality]['layers']} layers pooled, {dev})",
                flush=True,
            )
            del backbone
    host = host_info()
    bench = {
        "stage": "embed",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else host["processor"],
        "rows": rows,
        "batch_size": batch,
        **results,
        "host": host,
    }
    return write_result(out_dir, bench)


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench embed --rows N --device D`, at `extract.batch_size`."""
    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    bench_embed(out, args.device, args.rows, cfg.extract.batch_size)
