"""Everything a sweep's trials read, made before Tune starts: each model pair extracted once
(for every layer any trial needs), its parameter counts, and the raw (unaligned) scores of
every layer pair."""

from __future__ import annotations

import dataclasses

from raysys.backbones import layer_name, select_layers
from raysys.checks import checked_eval_splits
from raysys.config import Config
from raysys.data.source import pair_source
from raysys.errors import ConfigError
from raysys.evaluate import score_raw
from raysys.extract import Extracted, extract
from raysys.sweep.plan import (
    LayerPair,
    Prepared,
    Resolved,
    Side,
    depth_of,
    layer_pairs,
    swept_values,
)


def needed_layers(spec: str, ids: list[int], n: int) -> str:
    """The extract layer spec (over a model's `n` hidden states) widened to every layer the
    sweep trains on."""
    if spec.strip().lower() in ("", "all"):
        return spec
    return ",".join(str(i) for i in sorted(set(select_layers(spec, n)) | set(ids)))


def prepare(cfg: Config, resolved: list[Resolved]) -> list[Prepared]:
    """Extract every model pair once (all layers any trial needs) and score the raw pairs;
    `resolved` is `check_sweep`'s answer (its ids are in `layer_pairs` order)."""
    asked = layer_pairs(cfg)
    prepared, params_cache = [], {}
    for vision, text, full, ids in resolved:
        totals = {m: len(b.layer_ids) for m, b in full.items()}
        ecfg = dataclasses.replace(
            cfg.extract,
            vision=vision,
            text=text,
            vision_layers=needed_layers(
                cfg.extract.vision_layers, [i for i, _ in ids], totals["image"]
            ),
            text_layers=needed_layers(cfg.extract.text_layers, [j for _, j in ids], totals["text"]),
        )
        ext = extract(dataclasses.replace(cfg, extract=ecfg))
        for name, backbone in ((vision, full["image"]), (text, full["text"])):
            if name not in params_cache:
                params_cache[name] = backbone.param_count()
        layers = [
            layer_pair(cfg, ext, vid, tid, totals, sides)
            for (vid, tid), sides in zip(ids, asked, strict=True)
        ]
        prepared.append(Prepared(vision, text, params_cache[vision], params_cache[text], layers))
    return prepared


def layer_pair(
    cfg: Config,
    ext: Extracted,
    vid: int,
    tid: int,
    totals: dict[str, int],
    asked: tuple[Side, Side] | None = None,
) -> LayerPair:
    """One layer pair of an extraction (`totals`: each modality's hidden-state count):
    checked for size, scored raw on `eval.split`. Its depths are the `asked` sides where
    they were relative depths (`depth_of`), the realised fractions otherwise."""
    asked = asked or (vid, tid)
    source = pair_source(ext, layer_name(vid), layer_name(tid))
    for manifest, column in ((ext.image_manifest, vid), (ext.text_manifest, tid)):
        if layer_name(column) not in manifest["layers"]:
            raise ConfigError(f"layer {column} of {manifest['backbone']} is not cached")
    # Swept batch sizes replace the base one: each must fit the train split, checked now
    # rather than inside a Tune trial.
    batches = swept_values("train.batch_size", cfg.sweep.params.get("train.batch_size", []))
    splits = checked_eval_splits(cfg, source, batches)
    # The split the trials are scored on, read once.
    split = cfg.eval.split
    scored = splits[split] if split in splits else source.load(split)
    return LayerPair(
        vision_layer=vid,
        text_layer=tid,
        vision_depth=depth_of(asked[0], vid, totals["image"]),
        text_depth=depth_of(asked[1], tid, totals["text"]),
        source=dataclasses.asdict(source),
        raw=score_raw(scored, cfg.eval),
    )
