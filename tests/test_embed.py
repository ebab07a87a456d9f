"""The embedding cache's storage dtype, without Ray: `extract.cache_dtype` resolved per
backbone and keying the stage, and a float16 overflow caught at the first part that has one
(a model's own NaN stays a counted reject)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysys.backbones import REJECT, Backbone, get_backbone
from raysys.data import cache
from raysys.embed import ERROR, REJECT_PARTS, EmbedActor, actor_error, cache_dtype, embed_batch
from raysys.errors import CacheError


class Given(Backbone):
    """A backbone whose 'model' returns its input rows: any value, NaN or overflow, on cue."""

    modality = "image"
    name = "given-values"

    @property
    def layer_ids(self) -> list[int]:
        return [0]

    @property
    def dims(self) -> list[int]:
        return [3]

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch

    def load(self, device: torch.device) -> None:
        self.device = device

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"L00": np.asarray(batch["x"], dtype=np.float32)}

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.name}


def _batch(rows: list[list[float]], reasons: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        "id": np.array([f"r{i}" for i in range(n)]),
        "x": np.array(rows, dtype=np.float32),
        REJECT: np.array(reasons or [""] * n, dtype=object),
    }


def _decoder_lm(folder: Path) -> Backbone:
    """A decoder-only LM's text tower, as far as the cache dtype needs it: its config."""
    from transformers import GPT2Config

    GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16).save_pretrained(folder)
    return get_backbone(f"hf:{folder}", "text")


def test_auto_stores_decoder_lm_text_layers_in_float32(tmp_path) -> None:
    from raysys.extract import stage_key

    decoder = _decoder_lm(tmp_path / "gpt2")
    encoder = get_backbone("minilm-l6", "text")
    vision = get_backbone("efficientnet-lite0", "image")
    assert cache_dtype(decoder, "auto") == "float32"
    assert cache_dtype(encoder, "auto") == cache_dtype(vision, "auto") == "float16"
    assert cache_dtype(vision, "float32") == "float32"  # an explicit choice wins
    assert cache_dtype(decoder, "float16") == "float16"
    # The dtype keys the stage: float16 and float32 caches of one model never mix.
    assert stage_key(encoder, "float16") != stage_key(encoder, "float32")
    assert stage_key(encoder, "float16") == stage_key(get_backbone("minilm-l6", "text"), "float16")


def test_model_nan_is_a_reject_and_overflow_stops_the_part() -> None:
    backbone = Given()
    rows = [[1.0, -2.5, 65504.0], [np.nan, 0.0, 0.0], [0.5, 0.5, 0.5]]
    table = embed_batch(backbone, _batch(rows, ["", "", "bad bytes"]))
    assert table[REJECT].to_pylist() == ["", "non-finite L00 embedding", "bad bytes"]
    assert table.schema.field("L00").type.value_type == "halffloat"
    np.testing.assert_array_equal(cache.to_numpy(table["L00"])[0], rows[0])  # 65,504 fits

    overflow = [[1.0, 2.0, 3.0], [0.0, -70000.0, 0.0], [np.nan, 1e6, 0.0]]
    with pytest.raises(CacheError) as err:
        embed_batch(backbone, _batch(overflow))
    message = str(err.value)
    for part in ("given-values", "layer L00", "1,000,000", "'r1'", "extract.cache_dtype=float32"):
        assert part in message, part

    # Stored as float32, the same values are kept exactly; the model's NaN row is a reject.
    table = embed_batch(backbone, _batch(overflow), "float32")
    assert table.schema.field("L00").type.value_type == "float"
    assert table[REJECT].to_pylist() == ["", "", "non-finite L00 embedding"]
    np.testing.assert_array_equal(cache.to_numpy(table["L00"])[:2], overflow[:2])


def test_an_actor_writes_nothing_of_a_part_that_overflows(tmp_path) -> None:
    actor = EmbedActor(Given(), False, 1, str(tmp_path), batch_size=2)
    fine = actor(_batch([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [np.nan, 0.0, 0.0]]))
    assert (int(fine["rows"][0]), int(fine["rejects"][0]), fine[ERROR][0]) == (2, 1, "")
    written = {p.name for p in tmp_path.rglob("*.parquet")}
    # The overflow is in the part's second forward batch: its first is not written either.
    bad = actor(_batch([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [1e5, 0.0, 0.0]]))
    assert (int(bad["rows"][0]), int(bad["rejects"][0]), bad["part"][0]) == (0, 0, "")
    # The error travels back as data (Ray Data would lose a raised one's cause); the driver
    # raises it as the very class and message the actor saw.
    err = actor_error(str(bad[ERROR][0]))
    assert type(err) is CacheError and "layer L00 has values up to 100,000" in str(err)
    assert {p.name for p in tmp_path.rglob("*.parquet")} == written
    assert len(list((tmp_path / REJECT_PARTS).iterdir())) == 1  # the first part's NaN row
    (part,) = tmp_path.glob("part-*.parquet")
    assert pq.read_schema(part).field("L00").type.value_type == "halffloat"


class _Bucket:
    """An s3fs stand-in: `cat_ranges` answers each key with its bytes or its error object,
    as s3fs does with `on_error="return"` (errors translated by s3fs's own table)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def cat_ranges(self, paths, starts, ends, on_error="raise"):
        assert on_error == "return"
        return [self.answers[p] for p in paths]


def _s3_error(code: str) -> OSError:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(
        ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")
    )


def test_only_a_bad_image_is_a_reject_and_a_storage_failure_fails_the_part(
    tmp_path, monkeypatch
) -> None:
    """A reject counts as done, so a resumed pass never retries it: only an image that is
    missing, denied or not a file becomes one; throttling, timeouts, a dropped connection or
    expired credentials fail the part instead (a rerun resumes and reads it)."""
    from raysys import embed, storage

    bucket = _Bucket(
        {
            "b/ok.png": b"png bytes",
            "b/gone.png": _s3_error("NoSuchKey"),
            "b/denied.png": _s3_error("AccessDenied"),  # also S3's answer for a missing key
        }
    )
    monkeypatch.setattr(storage, "fsspec_fs", lambda uri: (bucket, str(uri)[len("s3://") :]))
    (tmp_path / "here.png").write_bytes(b"local bytes")
    uris = ["s3://b/ok.png", "s3://b/gone.png", "s3://b/denied.png", str(tmp_path / "here.png")]
    uris += [str(tmp_path / "absent.png"), str(tmp_path), ""]
    data, reasons = embed.read_images(np.array(uris, dtype=object))
    assert [data[0], data[3]] == [b"png bytes", b"local bytes"]
    assert list(reasons[[0, 3]]) == ["", ""]
    for i in (1, 2, 4, 5):
        assert reasons[i].startswith("missing or unreadable image file"), reasons[i]
    assert reasons[6] == "no image in the corpus row"
    transient = {
        "SlowDown": _s3_error("SlowDown"),
        "RequestTimeout": _s3_error("RequestTimeout"),
        "InternalError": _s3_error("InternalError"),
        "ExpiredToken": _s3_error("ExpiredToken"),  # a PermissionError, but not the image's
        "reset": ConnectionResetError(104, "Connection reset by peer"),
    }
    for name, err in transient.items():
        bucket.answers["b/flaky.png"] = err
        with pytest.raises(OSError, match="'s3://b/flaky.png'") as raised:
            embed.read_images(np.array(["s3://b/ok.png", "s3://b/flaky.png"], dtype=object))
        assert raised.value.__cause__ is err, name
    real_open = open

    def failing_disk(path, *args, **kwargs):
        if str(path).endswith("here.png"):
            raise OSError(5, "Input/output error")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(embed, "open", failing_disk, raising=False)
    with pytest.raises(OSError, match="here.png") as raised:
        embed.read_images(np.array([str(tmp_path / "here.png")], dtype=object))
    # The driver gets it back only as text inside Ray Data's error; it finds it there.
    wrapped = RuntimeError(f"ray.exceptions.UserCodeException: Traceback ...\n{raised.value}")
    failure = embed.storage_failure(wrapped)
    assert isinstance(failure, CacheError) and "here.png" in str(failure)
    assert "rerunning it resumes" in str(failure)
    assert embed.storage_failure(RuntimeError("some other failure")) is None
    # A path too long is the row's fault: a reject, not a failed pass.
    monkeypatch.undo()
    data, reasons = embed.read_images(np.array([str(tmp_path / ("x" * 300))], dtype=object))
    assert reasons[0].startswith("missing or unreadable image file")
    # Every image of a batch denied: the nodes' access is at fault, not the images.
    monkeypatch.setattr(storage, "fsspec_fs", lambda uri: (bucket, str(uri)[len("s3://") :]))
    denied = [f"b/denied{i}.png" for i in range(embed.ALL_DENIED)]
    bucket.answers |= {key: _s3_error("AccessDenied") for key in denied}
    with pytest.raises(OSError, match="all 8 images of the batch were denied"):
        embed.read_images(np.array([f"s3://{k}" for k in denied], dtype=object))
    _, two = embed.read_images(np.array([f"s3://{k}" for k in denied[:2]], dtype=object))
    assert all(r.startswith("missing or unreadable") for r in two)  # a few: rejects
    bucket.answers["b/locked.png"] = _s3_error("AllAccessDisabled")
    with pytest.raises(OSError, match="locked.png"):
        embed.read_images(np.array(["s3://b/ok.png", "s3://b/locked.png"], dtype=object))
