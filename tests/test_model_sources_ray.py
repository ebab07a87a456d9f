"""An `hf:s3://` model through a real extraction pass: Ray Data's CPU tasks tokenize from the
node-local copy of the folder's small files, the actor copies the weights and loads them, and
the cached vectors are those of the same model loaded from a local folder."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import torch
from test_backbones import LONG, SHORT, _build_text

from raysys import storage
from raysys.backbones import get_backbone
from raysys.backbones.fetch import RemoteFolder, cache_root
from raysys.config import ExtractConfig
from raysys.data import cache
from raysys.extract import run_pass


def test_an_s3_model_extracts_like_its_local_folder(ray_cluster, s3_server, tmp_path) -> None:
    folder = tmp_path / "bert"
    _build_text("bert", folder)
    uri = s3_server.make_bucket("raysys-models-ray") + "/models/bert"
    storage.upload_dir(folder, uri)
    # The private Ray's workers share this machine's cache root: start from no copy of it,
    # and remove exactly the copies this test made afterwards.
    remote = RemoteFolder(uri, "test")
    small = remote.small_files()
    copies = [
        cache_root() / f"bert-{remote.version(names)}"
        for names in (small, small + ["model.safetensors"])
    ]
    for path in copies:
        shutil.rmtree(path, ignore_errors=True)
    captions = [SHORT, LONG, "a small red square", "the blue circle below a triangle"]
    table = pa.table(
        {"id": list("abcd"), "caption": captions, "negative": captions[1:] + captions[:1]}
    )
    try:
        backbone = get_backbone(f"hf:{uri}", "text", layers="0,-1")
        manifest = run_pass(
            backbone, table, str(tmp_path / "cache"), ExtractConfig(batch_size=2), {}
        )
        assert manifest["rows"] == 4
        assert (copies[1] / "model.safetensors").is_file()  # the actor's copy of the weights
        ids, got = cache.read_layers(tmp_path / "cache", ["L00", "L02", "neg_L02"])

        local = get_backbone(f"hf:{folder}", "text", layers="0,-1")
        local.load(torch.device("cpu"))
        want = local.embed(local.preprocess({k: np.array(v) for k, v in table.to_pydict().items()}))
        order = [list("abcd").index(i) for i in ids]
        for column, values in got.items():
            np.testing.assert_allclose(values, want[column][order], rtol=2e-3, atol=2e-3)
    finally:
        for path in copies:
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(f".{path.name}.lock").unlink(missing_ok=True)
