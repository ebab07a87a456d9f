"""Corpus files for the corpus tests (tests/test_corpora.py, tests/test_corpora_ray.py):
real PNGs with captions from the synthetic renderer, written as manifests and as
img2dataset-style webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from raysys.config import CorpusConfig
from raysys.corpora.synthetic import SyntheticConfig, generate

N_IMAGES = 12


def make_scenes() -> list[dict]:
    """Real PNGs with captions: the synthetic renderer's, two captions per image."""
    rows = generate(SyntheticConfig(size=2 * N_IMAGES, image_size=64, captions_per_image=2))
    by_image: dict[str, dict] = {}
    for r in rows:
        entry = by_image.setdefault(r["image_id"], {"image": r["image"], "captions": []})
        entry["captions"].append(r["caption"])
    return [{"name": f"img/{k}.png", **v} for k, v in by_image.items()]


def write_images(root: Path, scenes: list[dict]) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for s in scenes:
        (root / s["name"]).write_bytes(s["image"])


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def per_pair_rows(scenes: list[dict]) -> list[dict]:
    """One row per (image, caption), the flattened-COCO shape; the first pair supplies its
    own negative."""
    rows = [{"image": s["name"], "caption": c} for s in scenes for c in s["captions"]]
    rows[0]["negative"] = "a supplied negative"
    return rows


def corpus_config(path: str | Path, **kw) -> CorpusConfig:
    name = kw.pop("name", "manifest")
    return CorpusConfig(name=name, path=str(path), **kw)


def write_shards(root: Path, scenes: list[dict], per_shard: int = 5) -> list[Path]:
    """img2dataset's layout: `<key>.jpg|png` + `<key>.txt` + `<key>.json` per sample; the
    last sample of each shard carries its captions in the .json only (COCO style, a list)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s0 in range(0, len(scenes), per_shard):
        path = root / f"{s0 // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            chunk = scenes[s0 : s0 + per_shard]
            for k, scene in enumerate(chunk):
                key = f"{s0 // per_shard:05d}{k:04d}"
                members = {f"{key}.png": scene["image"]}
                if k < len(chunk) - 1:
                    members[f"{key}.txt"] = scene["captions"][0].encode()
                    members[f"{key}.json"] = json.dumps({"key": key}).encode()
                else:
                    members[f"{key}.json"] = json.dumps({"caption": scene["captions"]}).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards
