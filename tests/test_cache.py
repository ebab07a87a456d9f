"""Cache reads fail clearly on caches that do not belong together or hold bad numbers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_encodings import dictionary_encoded

from raysys.data import cache
from raysys.errors import CacheError
from raysys.jam import JAM, JAMConfig
from raysys.train.step import check_dims


def _write(directory, ids, columns: dict[str, np.ndarray], rejects=(), dtype="float16") -> None:
    directory.mkdir(parents=True)
    table = {"id": pa.array(ids)} | {k: cache.list_array(v, dtype) for k, v in columns.items()}
    pq.write_table(pa.table(table), directory / "part-0.parquet")
    if rejects:
        pq.write_table(
            pa.table({"id": list(rejects), "reason": ["bad"] * len(rejects)}),
            directory / cache.REJECTS,
        )
    cache.write_manifest(directory, {"columns": list(columns), "layers": ["L00"]})


def _corpus(tmp_path, n=6, image=None, text=None, image_ids=None, rejects=(), text_dtype="float16"):
    rng = np.random.default_rng(0)
    rows = [
        {
            "pair_id": f"p{i}",
            "image_id": f"i{i}",
            "caption": f"c{i}",
            "negative": f"n{i}",
            "negative_source": "exact",
            "split": "test",
        }
        for i in range(n)
    ]
    cache.write_pairs(tmp_path / "corpus", rows)
    image = rng.normal(size=(n, 4)) if image is None else image
    text = rng.normal(size=(n, 3)) if text is None else text
    ids = image_ids or [f"i{i}" for i in range(n)]
    _write(tmp_path / "img", ids, {"L00": image}, rejects=rejects)
    text_columns = {"L00": text, "neg_L00": -text}
    _write(tmp_path / "txt", [f"p{i}" for i in range(n)], text_columns, dtype=text_dtype)
    return tmp_path / "corpus", tmp_path / "img", tmp_path / "txt"


def _load(dirs):
    return cache.load_pairs(*dirs, "L00", "L00", "test")


def _number(pair_ids: np.ndarray) -> np.ndarray:
    """Each pair's i (`p<i>`): which row of the given arrays it is, in whatever order the
    bucketed corpus index lists the pairs."""
    return np.array([int(p[1:]) for p in pair_ids])


def test_pairs_join_by_id_not_by_position(tmp_path) -> None:
    image = np.arange(24, dtype=float).reshape(6, 4)
    ids = [f"i{i}" for i in (5, 4, 3, 2, 1, 0)]  # stored in reverse order
    pairs = _load(_corpus(tmp_path, image=image[::-1].copy(), image_ids=ids))
    np.testing.assert_array_equal(np.sort(_number(pairs.pair_ids)), np.arange(6))
    np.testing.assert_array_equal(pairs.image.astype(float), image[_number(pairs.pair_ids)])


def test_selected_rows_are_the_same_as_the_full_load(tmp_path) -> None:
    dirs = _corpus(tmp_path, n=30)
    full = _load(dirs)
    select = np.array([29, 3, 17, 3, 0])
    part = cache.load_pairs(*dirs, "L00", "L00", "test", select=select)
    np.testing.assert_array_equal(part.pair_ids, full.pair_ids[select])
    for name in ("image", "text", "negative"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[select])
    # Read in small record batches, the same rows come back.
    rows = cache.read_rows(dirs[1], ["L00"], full.image_ids[select], batch_rows=4)["L00"]
    np.testing.assert_array_equal(rows, full.image[select])


def test_nan_and_inf_are_reported_with_their_ids(tmp_path) -> None:
    image = np.ones((6, 4))
    image[2, 1] = np.nan
    text = np.ones((6, 3))
    text[4, 0] = 1e6  # overflows float16 to inf
    with pytest.raises(CacheError, match=r"2 pair\(s\) have NaN or inf") as err:
        _load(_corpus(tmp_path, image=image, text=text))
    assert "'p2'" in str(err.value) and "'p4'" in str(err.value)


def test_float16_image_and_float32_text_layers_load_together(tmp_path) -> None:
    """A decoder LM's text cache is float32 (auto), the vision cache float16: every reader
    returns each layer in its stored dtype, the float32 values past float16's range intact."""
    text = np.array([[70000.25, -1.5, 3.0]] * 6) * np.arange(1, 7)[:, None]
    dirs = _corpus(tmp_path, text=text, text_dtype="float32")
    full = _load(dirs)
    assert (full.image.dtype, full.text.dtype, full.negative.dtype) == (
        np.float16,
        np.float32,
        np.float32,
    )
    at = _number(full.pair_ids)
    np.testing.assert_array_equal(full.text, text[at].astype(np.float32))
    np.testing.assert_array_equal(full.negative, -text[at].astype(np.float32))
    part = cache.load_pairs(*dirs, "L00", "L00", "test", select=np.array([4, 1]))
    np.testing.assert_array_equal(part.text, full.text[[4, 1]])
    _, layers = cache.read_layers(dirs[2], ["L00"])
    assert layers["L00"].dtype == np.float32


def test_ids_from_another_corpus_are_refused(tmp_path) -> None:
    ids = [f"i{i}" for i in range(5)] + ["other"]
    with pytest.raises(CacheError, match="1 image id.*neither in the cache") as err:
        _load(_corpus(tmp_path, image_ids=ids))
    assert "i5" in str(err.value)


def test_rejected_rows_are_left_out_not_reported_missing(tmp_path) -> None:
    ids = [f"i{i}" for i in range(5)] + ["gone"]
    pairs = _load(_corpus(tmp_path, image_ids=ids, rejects=["i5"]))
    assert len(pairs) == 5 and "p5" not in pairs.pair_ids


def test_model_dims_must_match_the_cache() -> None:
    model = JAM(JAMConfig(d_image=4, d_text=3, hidden=(8,), latent=2))
    check_dims(model, 4, 3, "the model")
    with pytest.raises(CacheError, match="width 4/3, but the cached layers are 5/3"):
        check_dims(model, 5, 3, "the model")


def test_a_split_is_counted_as_pair_index_keeps_it(tmp_path) -> None:
    """The driver's count without holding the split: rejected images and texts are left out,
    as `pair_index` leaves them out."""
    ids = [f"i{i}" for i in range(5)] + ["gone"]
    dirs = _corpus(tmp_path, n=6, image_ids=ids, rejects=["i5"])
    assert cache.count_pairs(*dirs, "test") == len(_load(dirs)) == 5
    assert cache.count_pairs(*dirs, "train") == 0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_nonfinite_rows_finds_nan_and_both_infinities_and_nothing_else(dtype: str) -> None:
    from raysys.data.cache import nonfinite_rows

    info = np.finfo(dtype)
    rows = np.zeros((6, 5), dtype=dtype)
    rows[1, 4], rows[2, 0], rows[3, 2] = np.nan, np.inf, -np.inf
    rows[4] = [info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0]  # all finite
    assert nonfinite_rows(rows).tolist() == [False, True, True, True, False, False]
    assert nonfinite_rows(rows[:, 1:4]).tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize("write", [cache.write_part, cache.write_bucketed])
def test_layers_are_written_without_a_dictionary_and_read_back_whole(tmp_path, write) -> None:
    """A float16 layer under Parquet's default dictionary decodes 4-5x slower; ids keep one.
    (Parts written before, with the dictionary, still read: `_write` above writes them so.)"""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(300, 8))
    text = rng.normal(size=(300, 5))
    table = pa.table(
        {
            "id": [f"i{i:03d}" for i in range(300)],
            "L00": cache.list_array(image),
            "L01": cache.list_array(text, "float32"),
            cache.BUCKET: pa.array(rng.integers(0, 4, 300), pa.int16()),
        }
    )
    uri = tmp_path / "part-0.parquet"
    write(table, uri)
    assert dictionary_encoded(uri) == {"id": True, "L00": False, "L01": False, cache.BUCKET: True}
    back = cache.read_parquet(uri).sort_by("id")  # write_bucketed reorders the rows
    assert back.schema == table.schema
    assert back["id"].to_pylist() == table["id"].to_pylist()
    np.testing.assert_array_equal(cache.to_numpy(back["L00"]), image.astype("float16"))
    np.testing.assert_array_equal(cache.to_numpy(back["L01"]), text.astype("float32"))
