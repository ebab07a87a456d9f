"""`raysys probe` end to end on the shared small cache, raw and with one exported model."""

from __future__ import annotations

import json

from raysys import config
from raysys import probe as P
from raysys.data.source import pair_source
from raysys.jam import JAM, JAMConfig


def test_probe_writes_rows_for_every_pair_type_raw_and_jam(small_cache, tmp_path) -> None:
    cfg, ext = small_cache
    # A stand-in for a finished run: one exported (untrained) model with its provenance.
    run = tmp_path / "run"
    iml, txl = ext.image_manifest["layers"][-1], ext.text_manifest["layers"][-1]
    test = pair_source(ext, iml, txl).load("test")
    widths = {"d_image": test.image.shape[1], "d_text": test.text.shape[1]}
    JAM(JAMConfig(**widths, hidden=(16,), latent=8, dropout=0.0)).save(run / "models" / "con")
    provenance = {"objective": "con", "vision": cfg.extract.vision, "text": cfg.extract.text}
    provenance |= {"image_layer": iml, "text_layer": txl}
    (run / "models" / "con" / "provenance.json").write_text(json.dumps(provenance))
    pcfg = config.from_dict(config.to_dict(cfg))
    for key, value in (
        ("probe.resamples", 2),
        ("probe.dim", 4),
        ("probe.metrics", ["cka", "cca", "mutual_knn"]),
        ("probe.models", str(run)),
    ):
        config.set_key(pcfg, key, value)

    out = P.probe(pcfg, tmp_path / "probe")

    rows = P.read_csv(out / P.PROBE_CSV)
    assert tuple(rows[0]) == P.COLUMNS
    for stage in ("raw", "jam"):
        mine = [r for r in rows if r["stage"] == stage]
        assert {r["pair_type"] for r in mine} == set(P.PAIR_TYPES)
        assert {r["reduction"] for r in mine} == {"linear", "rbf"}
        assert {r["metric"] for r in mine} == {"cka", "cca", "mutual_knn"}
    assert {r["model"] for r in rows if r["stage"] == "jam"} == {"con"}
    alignment = P.read_csv(out / P.ALIGNMENT_CSV)
    n_layers = len(ext.image_manifest["layers"]) * len(ext.text_manifest["layers"])
    assert len(alignment) == n_layers
    for name in ("probe.png", "alignment.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "**jam**" in (out / P.PROBE_MD).read_text()
