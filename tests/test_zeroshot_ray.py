"""Class prompts are embedded by the text stage's backbone exactly as its captions were: a
prompt that is also a caption gets the caption's cached embedding; a finished file is reused."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa

from raysys.backbones import configured_backbone
from raysys.data import cache
from raysys.zeroshot import embed_prompts, load_prompts


def test_a_prompt_that_is_a_caption_gets_the_captions_embedding(small_cache, capsys) -> None:
    cfg, ext = small_cache
    pairs = ext.corpus.pairs
    # Three captions become the classes of the only task, a labelled one; template "{}"
    # makes each class's first prompt the caption itself.
    captions = pairs["caption"].to_pylist()[:3]
    labels = [json.dumps({"label": c}) for c in captions] + [None] * (pairs.num_rows - 3)
    pairs = pairs.drop_columns([c for c in pairs.column_names if c == "labels"])
    own = {f.name: {} for f in dataclasses.fields(ext.corpus) if f.name == "zeroshot"}
    corpus = dataclasses.replace(
        ext.corpus, pairs=pairs.append_column("labels", pa.array(labels, pa.string())), **own
    )
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, zeroshot_templates=["{}", "a photo of {}."])
    )
    backbone = configured_backbone(cfg.extract, "text")

    uri = embed_prompts(cfg, corpus, backbone, ext.text_dir)
    assert uri is not None and uri.startswith(os.path.join(ext.corpus_dir, "prompts"))

    layers = ext.text_manifest["layers"]
    ids = pairs["pair_id"].to_numpy(zero_copy_only=False)[:3]
    cached = cache.read_rows(ext.text_dir, [layers[0], layers[-1]], ids)
    for layer in (layers[0], layers[-1]):
        classes, emb = load_prompts(uri, layer)["label"]
        assert emb.shape == (3, 2, cached[layer].shape[1])
        assert emb.dtype == cached[layer].dtype  # the text cache's dtype
        for row, caption in enumerate(captions):
            prompt = emb[classes.index(caption), 0].astype(np.float32)
            np.testing.assert_allclose(prompt, cached[layer][row].astype(np.float32), atol=1e-3)
            templated = emb[classes.index(caption), 1].astype(np.float32)
            assert np.abs(templated - prompt).max() > 0.05  # another text, another vector

    stamp = os.stat(uri).st_mtime_ns
    capsys.readouterr()
    assert embed_prompts(cfg, corpus, backbone, ext.text_dir) == uri  # no Ray task: reused
    assert "cached" in capsys.readouterr().out
    assert os.stat(uri).st_mtime_ns == stamp
