"""TensorBoard HParams and embedding-projector output for a finished training run.

The trainer's rank 0 already writes scalar curves under `<run>/tensorboard/<objective>/`. This
module adds the two views that compare *runs* rather than steps, as plain functions the trainer
calls once a run is done:

- `write_hparams` puts one row into TensorBoard's HParams tab: the run's config next to its
  final metrics. Every run of a sweep writes into its own log dir under a common parent, and
  `tensorboard --logdir PARENT` lines them up config → metrics.
- `write_projector` exports a sample of test latents (one tensor per modality, caption labels,
  optional image thumbnails) for the Embedding Projector.

Both write into `log_dir` itself — never into a sub-directory — so that one run stays one
TensorBoard run (`SummaryWriter.add_hparams` would add a timestamped sub-run per call).

Layout written into `log_dir` (next to whatever the trainer wrote there):

    events.out.tfevents.*            hparams experiment / session start / session end summaries
                                     and the `hparam/<metric>` scalars (write_hparams)
    projector_config.pbtxt           one `embeddings` entry per latent key (write_projector)
    00000/<tag>/tensors.tsv          N rows x D tab-separated float32 values
    00000/<tag>/metadata.tsv         N caption labels, one per line, no header
    00000/<tag>/sprite.png           only with thumbnails: ceil(sqrt N) x ceil(sqrt N) tiles
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from PIL import Image, ImageOps, UnidentifiedImageError
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams.api_pb2 import DataType
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from raysys import config
from raysys.config import Config
from raysys.corpora import Corpus
from raysys.data.pairs import Pairs
from raysys.jam import JAM

logger = logging.getLogger(__name__)

HParamValue = bool | int | float | str

# Prefix of the scalar tags that carry the metrics shown in the HParams tab.
METRIC_PREFIX = "hparam/"
# The ending of the event file that holds a run's HParams session (TensorBoard reads any
# file with `tfevents` in its name), so writing the session again replaces it.
HPARAMS_SUFFIX = ".hparams"
# The projector front end refuses sprite images larger than this on either side.
MAX_SPRITE_PX = 8192
# Global step of every projector entry; the step is part of its path and tensor name.
PROJECTOR_STEP = 0
PROJECTOR_CONFIG = "projector_config.pbtxt"
# What an empty caption becomes: the projector skips blank metadata lines, which would shift
# every later label onto the wrong point.
EMPTY_LABEL = "(empty)"
# Tabs would split a label into columns (a tab in the first line even turns it into a header
# row) and any line break would split it into rows; both become a space.
_LABEL_BREAKS = re.compile(r"[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")


# ---------------------------------------------------------------------------------------------
# HParams
# ---------------------------------------------------------------------------------------------


def write_hparams(
    log_dir: str | Path,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> None:
    """Record one run's config and final metrics for TensorBoard's HParams tab.

    `hparams` may be nested (e.g. `dataclasses.asdict(config)`); it is flattened to dotted keys
    (`train.lr`). bool, int, float and str values are kept as such (bools stay bools, which
    `torch.utils.tensorboard` alone would turn into 1.0/0.0); lists, tuples, None and anything
    else become `str(value)`, since HParams only knows numbers, strings and bools.

    `metrics` maps metric names to numbers (nested dicts are flattened the same way). Each is
    logged as the scalar `hparam/<name>` (a name already starting with `hparam/` is kept) and
    listed as a metric of the run. The HParams tab shows the *last* value of a metric's tag in
    the run, so reusing a per-epoch tag such as `val/i2t_r1` would show the last validation
    point instead of the value passed here, and writing there would add a stray point to the
    training curve; the separate `hparam/` namespace avoids both.

    Call it once per run, after training. In a sweep the HParams tab takes the list of columns
    from one arbitrary run's summary, so runs that are compared should pass the same keys.

    Raises:
        ValueError: a metric is not a real number, or two keys flatten to the same name.
    """
    flat_hparams = {key: _hparam_value(value) for key, value in _flatten(hparams).items()}
    flat_metrics = {_metric_tag(key): _metric_value(key, v) for key, v in _flatten(metrics).items()}
    experiment, start, end = hparams_summaries(flat_hparams, flat_metrics)
    bools = {key for key, value in flat_hparams.items() if isinstance(value, bool)}
    if bools:
        _restore_bools(experiment, start, bools)
    # A run writes one session: a population re-run on resume scores its members again, and
    # a second session in the same run would show twice in the HParams tab.
    for earlier in Path(log_dir).glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"):
        earlier.unlink()
    with SummaryWriter(str(log_dir), filename_suffix=HPARAMS_SUFFIX) as writer:
        file_writer = writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for tag, value in flat_metrics.items():
            writer.add_scalar(tag, value, 0)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → one level with dotted keys, so every leaf is its own HParams column."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        items = _flatten(value, f"{name}.") if isinstance(value, Mapping) else {name: value}
        for leaf, leaf_value in items.items():
            if leaf in flat:
                raise ValueError(f"two entries flatten to the same key {leaf!r}")
            flat[leaf] = leaf_value
    return flat


def _hparam_value(value: Any) -> HParamValue:
    """A value HParams can show: bool/int/float/str as is, everything else as its str()."""
    value = _unwrap_scalar(value)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _unwrap_scalar(value: Any) -> Any:
    """numpy / torch one-element values → the Python number they hold."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.size == 1):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _metric_tag(name: str) -> str:
    return name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name


def _metric_value(name: str, value: Any) -> float:
    value = _unwrap_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"metric {name!r} must be a real number, got {value!r}")
    return float(value)


def _restore_bools(experiment: Summary, start: Summary, keys: set[str]) -> None:
    """Re-type bool hparams in place: torch's `hparams()` tests `isinstance(v, (int, float))`
    before `bool`, so it records True/False as the numbers 1/0."""
    exp_data = _plugin_data(experiment)
    for info in exp_data.experiment.hparam_infos:
        if info.name in keys:
            info.type = DataType.DATA_TYPE_BOOL
    _set_plugin_data(experiment, exp_data)
    start_data = _plugin_data(start)
    for key in keys:
        value = start_data.session_start_info.hparams[key]
        value.bool_value = bool(value.number_value)
    _set_plugin_data(start, start_data)


def _plugin_data(summary: Summary) -> HParamsPluginData:
    return HParamsPluginData.FromString(summary.value[0].metadata.plugin_data.content)


def _set_plugin_data(summary: Summary, data: HParamsPluginData) -> None:
    summary.value[0].metadata.plugin_data.content = data.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Embedding projector
# ---------------------------------------------------------------------------------------------


def write_projector(
    log_dir: str | Path,
    latents: Mapping[str, np.ndarray | torch.Tensor],
    labels: Sequence[str],
    thumbnails: Sequence[bytes | np.ndarray] | np.ndarray | None = None,
    thumb_size: int = 32,
) -> None:
    """Export paired latents (e.g. `{"image": zi[:n], "text": zt[:n]}`) to the Embedding
    Projector, each key one tensor of N points labelled by the N captions.

    Row i of every tensor is the same image-caption pair, so the same labels and the same
    sprite are attached to *every* tensor: a text point then shows the image it describes,
    which is what one wants to see when judging cross-modal alignment.

    `thumbnails` — encoded images (PNG/JPEG bytes) or uint8 arrays, HxWxC (C = 1, 3 or 4) or
    HxW, one per point, or one NxHxW[xC] uint8 array — are letterboxed (aspect kept, black
    bars) to `thumb_size` x `thumb_size` tiles of a square sprite, row-major in point order.

    Captions are sanitised for metadata.tsv: tabs and line breaks become one space; an empty
    caption becomes "(empty)". Entries already in the log dir's projector_config.pbtxt under
    other tags are kept, so the function may be called more than once per log dir; the same tag
    written again replaces its entry. Tensor names are `<tag>:00000`.

    Raises:
        ValueError: on empty or non-2-D or non-finite latents, row counts that differ from
            `len(labels)`, a thumbnail count that differs, an undecodable thumbnail, or a
            sprite beyond the projector's 8192-pixel limit. Nothing is written then.
    """
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of captions, not one string")
    n = len(labels)
    if not latents:
        raise ValueError("latents is empty: pass at least one tag -> (N, D) array")
    if n == 0:
        raise ValueError("labels is empty: the projector needs at least one point")
    mats = {tag: _as_matrix(tag, value, n) for tag, value in latents.items()}
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be positive, got {thumb_size}")
    sprite_px = math.ceil(math.sqrt(n)) * thumb_size
    if thumbnails is not None and sprite_px > MAX_SPRITE_PX:
        raise ValueError(
            f"a sprite of {n} thumbnails at {thumb_size}px is {sprite_px}px wide; the projector "
            f"shows at most {MAX_SPRITE_PX}px: sample fewer points or lower thumb_size"
        )
    label_img = None if thumbnails is None else _thumbnail_batch(thumbnails, n, thumb_size)
    metadata = [sanitize_label(label) for label in labels]

    config_path = Path(log_dir) / PROJECTOR_CONFIG
    previous = _read_projector_config(config_path)
    with SummaryWriter(str(log_dir)) as writer:
        for tag, mat in mats.items():
            writer.add_embedding(
                mat, metadata=metadata, label_img=label_img, tag=tag, global_step=PROJECTOR_STEP
            )
    written = _read_projector_config(config_path)
    names = {embedding.tensor_name for embedding in written.embeddings}
    merged = ProjectorConfig()
    merged.embeddings.extend(e for e in previous.embeddings if e.tensor_name not in names)
    merged.embeddings.extend(written.embeddings)
    config_path.write_text(text_format.MessageToString(merged))


def sanitize_label(label: object) -> str:
    """One metadata.tsv cell: no tab (column break), no line break (row break), not blank."""
    text = _LABEL_BREAKS.sub(" ", str(label))
    return text if text.strip() else EMPTY_LABEL


def _as_matrix(tag: object, value: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    """(N, D) float32, checked: the projector reads float32 and cannot show NaN or inf."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"latent tags must be non-empty strings, got {tag!r}")
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    mat = np.asarray(value, dtype=np.float32)
    if mat.ndim != 2:
        raise ValueError(f"latents[{tag!r}] must be 2-D (N, D), got shape {mat.shape}")
    if mat.shape[0] != n:
        raise ValueError(
            f"latents[{tag!r}] has {mat.shape[0]} rows but {n} labels were given; "
            "each row needs exactly one label"
        )
    if not np.isfinite(mat).all():
        raise ValueError(f"latents[{tag!r}] contains NaN or inf")
    return mat


def _thumbnail_batch(
    thumbnails: Sequence[bytes | np.ndarray] | np.ndarray, n: int, size: int
) -> torch.Tensor:
    """N x 3 x size x size float32 in [0, 1], the `label_img` that add_embedding expects."""
    if len(thumbnails) != n:
        raise ValueError(f"got {len(thumbnails)} thumbnails for {n} labels; need one per point")
    tiles = np.stack([_thumbnail(i, thumb, size) for i, thumb in enumerate(thumbnails)])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0


def _thumbnail(index: int, thumb: bytes | np.ndarray, size: int) -> np.ndarray:
    if isinstance(thumb, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(thumb))
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"thumbnails[{index}] is not a decodable image: {err}") from err
    else:
        array = np.asarray(thumb)
        if array.dtype != np.uint8:
            raise ValueError(f"thumbnails[{index}] must be uint8, got {array.dtype}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(f"thumbnails[{index}] must be HxW or HxWxC, got {array.shape}")
        image = Image.fromarray(array)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = ImageOps.pad(image, (size, size), method=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _read_projector_config(path: Path) -> ProjectorConfig:
    config = ProjectorConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as err:
            logger.warning("replacing unreadable %s: %s", path, err)
            config = ProjectorConfig()
    return config


PROJECTOR_POINTS = 200  # enough to see the structure, small enough for the browser


def projector_sample(corpus: Corpus, test: Pairs) -> dict[str, Any]:
    """The first test pairs, with their captions and image thumbnails (None where the corpus
    cannot hand out single images cheaply, as tar shards), for the projector."""
    n = min(PROJECTOR_POINTS, len(test))
    thumbnails = corpus.thumbnails(str(i) for i in test.image_ids[:n])
    return {
        "image": test.image[:n],
        "text": test.text[:n],
        "labels": [str(c) for c in test.captions[:n]],
        "thumbnails": thumbnails,
    }


def write_run_summaries(
    log_dir: Path, cfg: Config, model: JAM, scores: dict[str, float], sample: dict[str, Any]
) -> None:
    """HParams (config -> test metrics, so runs compare in the HParams tab) and the
    embedding projector over a sample of test latents with captions and thumbnails."""
    hparams = {
        "objective": cfg.train.objective,
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "train": {k: v for k, v in config.to_dict(cfg.train).items() if k != "objective"},
    }
    write_hparams(log_dir, hparams, {f"test/{k}": v for k, v in scores.items()})
    model.eval()
    with torch.no_grad():
        latents = {
            "image": model.encode_image(torch.as_tensor(sample["image"])),
            "text": model.encode_text(torch.as_tensor(sample["text"])),
        }
    write_projector(log_dir, latents, sample["labels"], sample["thumbnails"])
