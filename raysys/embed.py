"""Extraction's compute, without Ray: a batch's CPU preprocessing (`Prepare`) and the frozen
backbone's forward over it (`EmbedActor`, `embed_batch`).

`raysys.extract` runs these as Ray Data's `map_batches` stage and actor pool. (`raysys bench
embed` times `Backbone.embed`, what `embed_batch` calls, without this module: it must run
where pyarrow is absent.)
"""

from __future__ import annotations

import errno
import re
import uuid
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raysys import errors, storage
from raysys.backbones import REJECT, Backbone, layer_name, pick_device
from raysys.data import cache
from raysys.data.pairs import buckets as bucket_of
from raysys.errors import CacheError, RaysysError

REJECT_PARTS = "rejects.parts"  # actors' reject files, merged into cache.REJECTS at the end
ERROR = "error"  # a part's raysys error ("CacheError: message"), returned as data; see below


class Prepare:
    """The CPU stage: read images named by URI, then the backbone's own preprocessing
    (decode/resize or tokenize); a reason given upstream (an unreadable file) wins over the
    one preprocessing would give the empty row. A `bucket` column (a text pass's, from the
    corpus index) passes through to the actor."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prior = np.full(len(batch["id"]), "", dtype=object)
        if "uri" in batch:
            batch = dict(batch)
            batch["image"], prior = read_images(batch.pop("uri"))
        out = self.backbone.preprocess(batch)
        reasons = np.asarray(out[REJECT], dtype=object)
        out[REJECT] = np.where(prior != "", prior, reasons)
        if cache.BUCKET in batch:
            out[cache.BUCKET] = batch[cache.BUCKET]
        return out


def read_images(uris: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of each image file (local or s3://), and a reject reason for each one that is
    missing, denied or not a file; S3 objects are fetched concurrently (one s3fs
    `cat_ranges` per batch). Any other read error (throttling, a timeout, a dropped
    connection, expired credentials) raises: a reject counts as done and is never retried,
    while a failed part is redone by a rerun, which resumes the pass."""
    data = np.empty(len(uris), dtype=object)
    reasons = np.full(len(uris), "", dtype=object)
    todo = [i for i, u in enumerate(uris) if isinstance(u, str) and u]
    remote = [i for i in todo if storage.is_remote(uris[i])]
    if remote:
        fs, _ = storage.fsspec_fs(uris[remote[0]])
        paths = [storage.fsspec_fs(uris[i])[1] for i in remote]
        # cat_ranges, not cat: cat expands glob characters, which are legal in S3 keys.
        got = fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return")
        denied = [i for i, v in zip(remote, got, strict=True) if isinstance(v, PermissionError)]
        if len(denied) == len(remote) >= ALL_DENIED:  # the nodes' access, not the images
            _failed(
                uris[denied[0]],
                got[0],
                f"all {len(denied)} images of the batch were denied: the nodes' credentials "
                "likely lack s3:GetObject there (if the images are really gone, as S3 says 403 "
                "for a missing key to a reader without s3:ListBucket, drop them from the "
                "corpus); ",
            )
        for i, value in zip(remote, got, strict=True):
            if isinstance(value, bytes):
                data[i] = value
            else:
                reasons[i] = _unreadable(uris[i], value)
    for i in set(todo) - set(remote):
        try:
            with open(uris[i].removeprefix("file://"), "rb") as f:
                data[i] = f.read()
        except OSError as e:
            reasons[i] = _unreadable(uris[i], e)
    for i in set(range(len(uris))) - set(todo):
        reasons[i] = "no image in the corpus row"
    return data, reasons


# Errors that say the image itself cannot be had. A PermissionError is one (S3 answers a
# missing key with 403 AccessDenied to a reader who may not list the bucket), unless s3fs
# made it from one of these codes, which say the session's account or credentials are at
# fault; so are a local path too long or looping through its links.
BAD_IMAGE = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
BAD_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP})
CREDENTIAL_CODES = frozenset(
    {"ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed"}
    | {"AccountProblem", "AllAccessDisabled", "InvalidPayer", "InvalidSecurity", "NotSignedUp"}
)
ALL_DENIED = 8  # this many images of one batch, all denied, is an access problem
# What a storage failure's message starts with: the driver finds it in the text of the error
# Ray Data hands back (`storage_failure`), which has lost the exception itself.
STORAGE_FAILED = "reading an image failed"


def _unreadable(uri: str, err: BaseException) -> str:
    """The reject reason for an image that is missing, denied or not a file; any other
    error is raised, naming the image."""
    response = getattr(err.__cause__, "response", None)  # s3fs keeps botocore's error
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    bad_path = isinstance(err, OSError) and err.errno in BAD_PATH_ERRNOS
    if (isinstance(err, BAD_IMAGE) and code not in CREDENTIAL_CODES) or bad_path:
        why = getattr(err, "strerror", None) or type(err).__name__
        return f"missing or unreadable image file: {why}"
    _failed(uri, err)


def _failed(uri: str, err: BaseException, why: str = "") -> NoReturn:
    raise OSError(
        f"{STORAGE_FAILED}: {uri!r} ({type(err).__name__}: {err}); {why}not a fault of the "
        "image, so it is not rejected: the pass stops, and rerunning it resumes"
    ) from err


def storage_failure(err: BaseException) -> CacheError | None:
    """The storage failure a batch raised (see `read_images`), found in the text of the
    error Ray Data returned for it, as a `CacheError` the CLI reports; None for others."""
    found = re.search(rf"{STORAGE_FAILED}: (.*)", str(err))
    return CacheError(f"{STORAGE_FAILED}: {found.group(1)}") if found else None


class EmbedActor:
    """Holds one frozen backbone for the lifetime of a Ray actor; each call embeds one part
    (`extract.part_rows` rows, in forward batches of `extract.batch_size`) and writes it.

    The actor writes its part itself, whole, straight to the cache (`out_dir`: a path, or an
    `s3://` URI when the actor runs on a node that shares no disk with the driver): good rows
    to a part and bad rows to a reject part. The pass streams through once (no materialized
    copy of every embedding), a killed pass leaves only whole parts, which a rerun keeps and
    skips, and only the part's name, counts and checksum travel back to the driver. Parts
    are laid out by bucket (see `raysys.data.cache`; `part_buckets` says which).

    A raysys error (a float16 overflow) travels back as data too, in `ERROR`: raised, Ray
    Data would wrap it in a UserCodeException whose cause is lost on the way to the driver.
    The driver raises it as itself (`actor_error`) the moment the part's row arrives.
    """

    def __init__(
        self,
        backbone: Backbone,
        use_gpu: bool,
        num_threads: int,
        out_dir: str,
        batch_size: int,
        dtype: str = "float16",
    ) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.backbone = backbone
        self.backbone.load(pick_device(use_gpu))
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.dtype = dtype  # the stage's resolved `extract.cache_dtype`

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        bucket = part_buckets(batch, self.backbone.modality)
        batch = {k: v for k, v in batch.items() if k != cache.BUCKET}
        try:  # a float16 overflow raises here, before anything of the part is written
            table = pa.concat_tables(
                embed_batch(
                    self.backbone,
                    {k: v[i : i + self.batch_size] for k, v in batch.items()},
                    self.dtype,
                )
                for i in range(0, n, self.batch_size)
            )
        except RaysysError as err:
            return _result(0, 0, "", "", f"{type(err).__name__}: {err}")
        name = uuid.uuid4().hex
        bad = pc.not_equal(table[REJECT], "")
        n_bad = pc.sum(bad.cast("int64")).as_py() or 0
        if n_bad:  # rejects first: a part whose rejects are written is never redone for them
            rejects = table.filter(bad).select(["id", REJECT]).rename_columns(["id", "reason"])
            where = storage.join(self.out_dir, REJECT_PARTS, f"{name}.parquet")
            cache.write_part(rejects, where)
        part, sha256 = "", ""
        if n_bad < n:
            good = table.filter(pc.invert(bad)).drop_columns([REJECT])
            uri = storage.join(self.out_dir, f"part-{name}.parquet")
            if bucket is None:
                written = cache.write_part(good, uri)
            else:
                column = pa.array(bucket, pa.int16()).filter(pc.invert(bad))
                written = cache.write_bucketed(good.append_column(cache.BUCKET, column), uri)
            part, sha256 = written.name, written.sha256
        return _result(n - n_bad, n_bad, part, sha256, "")


def part_buckets(batch: dict[str, np.ndarray], modality: str) -> np.ndarray | None:
    """Each row's bucket (int16): the batch's own `bucket` column where it has one (a text
    pass's, from the corpus index: a caption's bucket is its image's), its row ids' where
    they are image ids (an image pass, or rows the column leaves null); None for a text pass
    given no buckets, whose pair ids do not tell a pair's image: such a part is written
    unsorted and read whole, never read by a wrong bucket."""
    ids = np.asarray(batch["id"]).astype(str)
    if cache.BUCKET not in batch:
        return bucket_of(ids) if modality == "image" else None
    given = pa.array(batch[cache.BUCKET], from_pandas=True)  # None and NaN as nulls
    missing = given.is_null().to_numpy(zero_copy_only=False)
    out = np.asarray(pc.fill_null(given, 0).cast(pa.int16())).copy()
    if missing.any():
        out[missing] = bucket_of(ids[missing])
    return out


def _result(rows: int, rejects: int, part: str, sha256: str, error: str) -> dict[str, np.ndarray]:
    """An actor call's one-row answer: what the driver records, or the error that ends it."""
    return {
        "rows": np.array([rows]),
        "rejects": np.array([rejects]),
        "part": np.array([part]),
        "sha256": np.array([sha256]),
        ERROR: np.array([error]),
    }


def actor_error(text: str) -> RaysysError:
    """An `ERROR` value back as the raysys exception the actor raised."""
    name, _, message = text.partition(": ")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, RaysysError)):
        return RaysysError(text)
    return cls(message)


def embed_batch(
    backbone: Backbone, batch: dict[str, np.ndarray], dtype: str = "float16"
) -> pa.Table:
    """Embed the good rows of a preprocessed batch, layers stored as `dtype`; bad rows pass
    through with their reason and empty layers, so nothing is dropped before it is counted.

    A row the model itself made NaN or inf is one bad row: a counted reject. A finite value
    that `dtype` cannot hold is the layer's scale, not the row's fault: every later part
    would lose rows the same way and the pass would fail only at its end, after all the GPU
    time, so it raises `CacheError` (see `check_range`) at the first batch that has one."""
    reasons = np.asarray(batch[REJECT], dtype=object)
    good = np.flatnonzero(reasons == "")
    ids = batch["id"].astype(str)
    columns: dict[str, Any] = {"id": pa.array(ids)}
    if len(good):
        layers = backbone.embed({k: v[good] for k, v in batch.items() if k != REJECT})
    for name, dim in layer_dims(backbone).items():
        full = np.zeros((len(reasons), dim), dtype=dtype)
        if len(good):
            values = np.asarray(layers[name])
            broken = good[~np.isfinite(values).all(1)]  # the model's own NaN or inf
            reasons[broken] = [r or f"non-finite {name} embedding" for r in reasons[broken]]
            full[good] = check_range(values, dtype, backbone, name, ids[good])
        columns[name] = cache.list_array(full, dtype)
    columns[REJECT] = pa.array(reasons.astype(str))
    return pa.table(columns)


def check_range(
    values: np.ndarray, dtype: str, backbone: Backbone, column: str, ids: np.ndarray
) -> np.ndarray:
    """`values` cast to `dtype`, or a `CacheError` when a finite value would become inf
    there: it names the backbone, the layer, the largest |value| and the fix."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(dtype)
    overflow = np.isinf(cast) & np.isfinite(values)
    if overflow.any():
        rows = overflow.any(1)
        peak = float(np.abs(values[np.isfinite(values)]).max())
        limit = float(np.finfo(dtype).max)
        raise CacheError(
            f"{backbone.modality} backbone {backbone.name}: layer {column} has values up to "
            f"{peak:,.0f} in absolute value ({int(rows.sum())} of {len(values)} rows of one "
            f"batch, e.g. id {str(ids[rows][0])!r}), past {dtype}'s largest finite value "
            f"({limit:,.0f}): cached as {dtype} they would be inf. The pass stopped at the "
            "first part with one (that part was not written); set extract.cache_dtype=float32 "
            "and rerun (auto picks float32 only for the text layers of decoder-only LMs)"
        )
    return cast


def cache_dtype(backbone: Backbone, setting: str) -> str:
    """`extract.cache_dtype` resolved for one backbone. `auto` keeps the text layers of
    decoder-only LMs in float32 (their outlier dimensions reach 1e3–1e4, where float16's step
    is 4–8, and can pass its 65,504) and everything else in float16 (half the bytes, and
    encoders' and vision models' features sit well inside its range)."""
    if setting != "auto":
        return setting
    decoder = backbone.modality == "text" and getattr(backbone, "kind", None) == "decoder"
    return "float32" if decoder else "float16"


def layer_dims(backbone: Backbone) -> dict[str, int]:
    """Column name -> width of every cached layer; a text pass also caches its negatives'."""
    dims = {layer_name(i): d for i, d in zip(backbone.layer_ids, backbone.dims, strict=True)}
    if backbone.modality == "text":
        dims |= {"neg_" + name: d for name, d in dims.items()}
    return dims


def say(backbone: Backbone, message: str) -> None:
    """An extraction progress line naming the pass (`[extract] text  minilm-l6: …`), flushed
    so it keeps its place among Ray's output; the passes and the zero-shot prompts share it."""
    print(f"[extract] {backbone.modality:5s} {backbone.name}: {message}", flush=True)
