"""Which columns of a Parquet file are dictionary-encoded: the cache writes its layers
without a dictionary and its ids with one (`raysys.data.cache.dictionary_columns`)."""

from __future__ import annotations

import pyarrow.parquet as pq


def dictionary_encoded(path) -> dict[str, bool]:
    """Per top-level column: whether any of its chunks, in any row group, is
    dictionary-encoded."""
    meta = pq.ParquetFile(path).metadata
    found: dict[str, bool] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            name = chunk.path_in_schema.split(".")[0]
            found[name] = found.get(name, False) or "RLE_DICTIONARY" in chunk.encodings
    return found
