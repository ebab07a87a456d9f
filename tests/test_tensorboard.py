"""Tests for raysys.report.tensorboard: every file is read back with TensorBoard's own code.

HParams summaries go through EventAccumulator and, for a sweep, through the HParams plugin's
ListSessionGroups handler (what the HParams tab displays). Projector output is parsed with the
ProjectorConfig proto and served through the projector plugin's own HTTP routes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tensorboard import context
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
from torch.utils.tensorboard import SummaryWriter
from werkzeug.test import Client

from raysys.report.tensorboard import (
    EMPTY_LABEL,
    METRIC_PREFIX,
    PROJECTOR_CONFIG,
    sanitize_label,
    write_hparams,
    write_projector,
)

HPARAMS = {
    "objective": "negcon",
    "train": {
        "lr": 3e-4,
        "epochs": 15,
        "hidden": [512, 256],
        "learn_logit_scale": True,
        "cross_reconstruction": False,
        "betas": (0.9, 0.99),
        "sched": {"warmup_steps": 20},
    },
    "note": None,
}
METRICS = {"i2t_r1": 0.655, "t2i_r1": np.float32(0.63), "mutual_knn": torch.tensor(0.547)}


def _expected_hparams() -> dict[str, tuple[str, object]]:
    """Flattened HPARAMS as (protobuf Value kind, value), derived from the nested dict."""
    out: dict[str, tuple[str, object]] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, bool):
                out[prefix + key] = ("bool_value", value)
            elif isinstance(value, (int, float)):
                out[prefix + key] = ("number_value", float(value))
            elif isinstance(value, str):
                out[prefix + key] = ("string_value", value)
            else:
                out[prefix + key] = ("string_value", str(value))

    walk(HPARAMS, "")
    return out


def _hparams_data(acc: EventAccumulator) -> dict[str, HParamsPluginData]:
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    return {tag: HParamsPluginData.FromString(raw) for tag, raw in content.items()}


def _as_dict(hparams_map) -> dict[str, tuple[str, object]]:
    return {
        k: (v.WhichOneof("kind"), getattr(v, v.WhichOneof("kind"))) for k, v in hparams_map.items()
    }


# ---------------------------------------------------------------------------------------------
# HParams
# ---------------------------------------------------------------------------------------------


def test_hparams_read_back_beside_trainer_scalars(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard" / "negcon"
    with SummaryWriter(str(log_dir)) as trainer:  # what rank 0 of the trainer writes
        for step, value in enumerate([0.2, 0.4, 0.6], start=1):
            trainer.add_scalar("val/i2t_r1", value, step * 10)

    write_hparams(log_dir, HPARAMS, METRICS)

    # One run is one directory: nothing may land in a sub-run.
    assert [p for p in log_dir.iterdir() if p.is_dir()] == []
    acc = EventAccumulator(str(log_dir), size_guidance={TENSORS: 0})
    acc.Reload()
    data = _hparams_data(acc)
    assert set(data) == {
        hp_metadata.EXPERIMENT_TAG,
        hp_metadata.SESSION_START_INFO_TAG,
        hp_metadata.SESSION_END_INFO_TAG,
    }

    expected = _expected_hparams()
    start = data[hp_metadata.SESSION_START_INFO_TAG].session_start_info
    assert _as_dict(start.hparams) == expected  # doubles round-trip exactly

    experiment = data[hp_metadata.EXPERIMENT_TAG].experiment
    kinds = {
        "bool_value": api_pb2.DATA_TYPE_BOOL,
        "number_value": api_pb2.DATA_TYPE_FLOAT64,
        "string_value": api_pb2.DATA_TYPE_STRING,
    }
    assert {info.name: info.type for info in experiment.hparam_infos} == {
        key: kinds[kind] for key, (kind, _) in expected.items()
    }
    metric_tags = {METRIC_PREFIX + name for name in METRICS}
    assert {info.name.tag for info in experiment.metric_infos} == metric_tags
    assert data[hp_metadata.SESSION_END_INFO_TAG].session_end_info.status == api_pb2.STATUS_SUCCESS

    scalars = set(acc.Tags()["scalars"])
    assert metric_tags <= scalars
    for name, value in METRICS.items():
        assert acc.Scalars(METRIC_PREFIX + name)[-1].value == pytest.approx(float(value), rel=1e-6)
    # The trainer's curve is untouched: no extra point was added to val/i2t_r1.
    assert [e.value for e in acc.Scalars("val/i2t_r1")] == pytest.approx([0.2, 0.4, 0.6])


def test_hparams_sweep_as_the_hparams_tab_sees_it(tmp_path: Path) -> None:
    runs = {
        "con-lr1e-3": ({"objective": "con", "train": {"lr": 1e-3, "tied": True}}, 0.71),
        "spread-lr1e-2": ({"objective": "spread", "train": {"lr": 1e-2, "tied": False}}, 0.66),
    }
    for name, (hparams, r1) in runs.items():
        write_hparams(tmp_path / name, hparams, {"hparam/i2t_r1": r1})  # prefix not doubled

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(tmp_path))
    tb_context = base_plugin.TBContext(
        data_provider=provider, multiplexer=multiplexer, logdir=str(tmp_path)
    )
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_SUCCESS], start_index=0, slice_size=100
    )
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", request
    ).run()

    groups = {group.name: group for group in response.session_groups}
    assert set(groups) == set(runs)
    for name, (hparams, r1) in runs.items():
        group = groups[name]
        assert _as_dict(group.hparams) == {
            "objective": ("string_value", hparams["objective"]),
            "train.lr": ("number_value", hparams["train"]["lr"]),
            "train.tied": ("bool_value", hparams["train"]["tied"]),
        }
        [metric] = group.metric_values
        assert metric.name.tag == "hparam/i2t_r1"
        assert metric.value == pytest.approx(r1, rel=1e-6)


@pytest.mark.parametrize(
    ("hparams", "metrics", "match"),
    [
        ({"lr": 1.0}, {"i2t_r1": "high"}, "real number"),
        ({"lr": 1.0}, {"i2t_r1": True}, "real number"),
        ({"a.b": 1, "a": {"b": 2}}, {}, "same key"),
    ],
)
def test_hparams_rejects_bad_input(tmp_path: Path, hparams, metrics, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_hparams(tmp_path / "run", hparams, metrics)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Embedding projector
# ---------------------------------------------------------------------------------------------

LABELS = [
    "a large red circle left of a small blue square",
    "tab\tseparated\tcaption",
    "two\nlines",
    "windows\r\nline end",
    "",
    "  ",
    "a small green triangle",
]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 37), (255, 255, 255), (7, 8, 9)]
COLOURS.append((128, 128, 128))


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _config(log_dir: Path) -> ProjectorConfig:
    config = ProjectorConfig()
    text_format.Parse((log_dir / PROJECTOR_CONFIG).read_text(), config)
    return config


def _tile(sprite: np.ndarray, index: int, grid: int, size: int) -> np.ndarray:
    row, col = divmod(index, grid)
    return sprite[row * size : (row + 1) * size, col * size : (col + 1) * size]


@pytest.fixture
def latents() -> dict[str, np.ndarray | torch.Tensor]:
    rng = np.random.default_rng(0)
    n = len(LABELS)
    return {
        "image": rng.standard_normal((n, 6)).astype(np.float32),
        "text": torch.from_numpy(rng.standard_normal((n, 4))).to(torch.float16),
    }


def test_projector_files_read_back(tmp_path: Path, latents) -> None:
    size = 16
    write_projector(tmp_path, latents, LABELS, [_png(c) for c in COLOURS], thumb_size=size)

    config = _config(tmp_path)
    by_name = {e.tensor_name.split(":")[0]: e for e in config.embeddings}
    assert set(by_name) == set(latents)
    n = len(LABELS)
    grid = math.ceil(math.sqrt(n))
    for tag, value in latents.items():
        embedding = by_name[tag]
        expected = torch.as_tensor(value).float().numpy()
        tensor = np.loadtxt(tmp_path / embedding.tensor_path, delimiter="\t", ndmin=2)
        assert tensor.shape == expected.shape
        np.testing.assert_allclose(tensor, expected, rtol=1e-6, atol=0)

        lines = (tmp_path / embedding.metadata_path).read_bytes().decode().split("\n")
        assert lines[-1] == "" and len(lines) == n + 1
        for line, label in zip(lines[:-1], LABELS, strict=True):
            assert "\t" not in line and "\r" not in line and line.strip()
            assert line == sanitize_label(label)
            assert line.split() == (label.split() or [EMPTY_LABEL])

        # Thumbnails are attached to every tag, row-major in point order.
        assert list(embedding.sprite.single_image_dim) == [size, size]
        sprite = np.asarray(Image.open(tmp_path / embedding.sprite.image_path).convert("RGB"))
        assert sprite.shape == (grid * size, grid * size, 3)
        for i, colour in enumerate(COLOURS):
            assert (_tile(sprite, i, grid, size) == colour).all(), (tag, i, colour)
        for i in range(n, grid * grid):  # unused tiles stay black
            assert (_tile(sprite, i, grid, size) == 0).all()


def test_projector_served_by_tensorboard(tmp_path: Path, latents) -> None:
    write_projector(tmp_path, latents, LABELS, [_png(c) for c in COLOURS], thumb_size=8)

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    plugin = ProjectorPlugin(
        base_plugin.TBContext(
            data_provider=MultiplexerDataProvider(multiplexer, str(tmp_path)),
            logdir=str(tmp_path),
        )
    )
    apps = plugin.get_plugin_apps()
    [run] = Client(apps["/runs"]).get("/").get_json()
    for tag, value in latents.items():
        query = {"run": run, "name": f"{tag}:00000"}
        tensor = Client(apps["/tensor"]).get("/", query_string=query)
        assert tensor.status_code == 200, tensor.get_data(as_text=True)
        expected = torch.as_tensor(value).float().numpy()
        served = np.frombuffer(tensor.get_data(), dtype=np.float32).reshape(expected.shape)
        np.testing.assert_array_equal(served, expected)

        meta = Client(apps["/metadata"]).get("/", query_string=query)
        assert meta.status_code == 200
        assert meta.get_data(as_text=True).splitlines() == [sanitize_label(x) for x in LABELS]

        sprite = Client(apps["/sprite_image"]).get("/", query_string=query)
        assert sprite.status_code == 200 and sprite.mimetype == "image/png"


def test_projector_array_thumbnails_are_letterboxed(tmp_path: Path) -> None:
    size = 8
    tall_red = np.zeros((4, 16, 8, 3), np.uint8)  # 16 high x 8 wide
    tall_red[..., 0] = 255
    write_projector(
        tmp_path, {"image": np.eye(4, 3)}, ["a", "b", "c", "d"], tall_red, thumb_size=size
    )
    [embedding] = _config(tmp_path).embeddings
    sprite = np.asarray(Image.open(tmp_path / embedding.sprite.image_path).convert("RGB"))
    assert sprite.shape == (2 * size, 2 * size, 3)
    tile = _tile(sprite, 3, 2, size)
    # Aspect kept: an 8-high, 4-wide red bar centred between black bars.
    assert (tile[:, 2:6] == (255, 0, 0)).all()
    assert (tile[:, :2] == 0).all() and (tile[:, 6:] == 0).all()


def test_projector_keeps_earlier_tags_and_replaces_same_tag(tmp_path: Path, latents) -> None:
    write_projector(tmp_path, {"image": latents["image"]}, LABELS)
    write_projector(tmp_path, {"text": latents["text"]}, LABELS)
    new_image = -np.asarray(latents["image"])
    write_projector(tmp_path, {"image": new_image}, LABELS)

    config = _config(tmp_path)
    names = sorted(e.tensor_name for e in config.embeddings)
    assert names == ["image:00000", "text:00000"]
    image = next(e for e in config.embeddings if e.tensor_name.startswith("image"))
    assert not image.sprite.image_path  # no thumbnails given
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / image.tensor_path, delimiter="\t"), new_image, rtol=1e-6
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda lat, lab, th: (lat, lab[:-1], th), r"7 rows but 6 labels"),
        (lambda lat, lab, th: ({**lat, "text": lat["text"][:-1]}, lab, th), r"6 rows but 7"),
        (lambda lat, lab, th: ({"image": lat["image"][:, 0]}, lab, th), "2-D"),
        (lambda lat, lab, th: ({}, lab, th), "empty"),
        (lambda lat, lab, th: (lat, lab, th[:-1]), "6 thumbnails for 7"),
        (lambda lat, lab, th: (lat, lab, [b"not a png", *th[1:]]), r"thumbnails\[0\]"),
        (
            lambda lat, lab, th: ({"image": np.full((len(lab), 2), np.nan)}, lab, th),
            "NaN or inf",
        ),
    ],
)
def test_projector_rejects_bad_input(tmp_path: Path, latents, change, match: str) -> None:
    args = change(latents, list(LABELS), [_png(c) for c in COLOURS])
    with pytest.raises(ValueError, match=match):
        write_projector(tmp_path / "run", *args)
    assert not (tmp_path / "run").exists()


def test_projector_rejects_sprite_beyond_viewer_limit(tmp_path: Path, latents) -> None:
    # 7 points → a 3 x 3 grid; 3 x 3000 px exceeds the projector's 8192 px before any decoding.
    with pytest.raises(ValueError, match="8192"):
        write_projector(tmp_path / "run", latents, LABELS, [b""] * len(LABELS), thumb_size=3000)
    assert not (tmp_path / "run").exists()


def test_writing_a_runs_hparams_again_replaces_its_session(tmp_path) -> None:
    """A population re-run on resume scores its members again: each keeps one session, with
    the new scores, beside its untouched training curves."""
    log_dir = tmp_path / "t000"
    with SummaryWriter(str(log_dir)) as trainer:
        trainer.add_scalar("val/i2t_r1", 0.2, 10)
    write_hparams(log_dir, HPARAMS, {"test/i2t_r1": 0.25})
    write_hparams(log_dir, HPARAMS, {"test/i2t_r1": 0.5})
    files = sorted(p.name for p in log_dir.iterdir())
    assert len(files) == 2 and sum(f.endswith(".hparams") for f in files) == 1, files
    acc = EventAccumulator(str(log_dir), size_guidance={TENSORS: 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("hparam/test/i2t_r1")] == [0.5]
    assert [e.value for e in acc.Scalars("val/i2t_r1")] == pytest.approx([0.2])
