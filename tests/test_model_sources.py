"""Models on fresh nodes: `hf:s3://…` and `open_clip:s3://…` folders copied once per node, and
the Hub branch's decisions (issue 13, point 7).

A "node" here is an empty HOME (so an empty `~/.cache/raysys/models` and HF cache); the S3
folders live on the suite's real S3 server (moto on 127.0.0.1). The models are the tiny ones of
`test_backbones.py`, built from configs and saved with `save_pretrained`; the reference is the
same folder loaded from local disk. Nothing here reaches the internet: the online Hub branch is
pointed at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_backbones import IMAGE_ROWS, NORM, TEXT_ROWS, TINY_CLIP, _build_text, _build_vision

from raysys import storage
from raysys.backbones import REJECT, get_backbone
from raysys.backbones.fetch import CACHE_ENV, RemoteFolder, is_weights
from raysys.data import cache
from raysys.errors import BackboneError

CPU = torch.device("cpu")
BUCKET = "raysys-models"


def _good(pre: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = pre[REJECT] == ""
    return {k: v[keep] for k, v in pre.items() if k != REJECT}


@pytest.fixture(scope="module")
def models(s3_server, tmp_path_factory):
    """Tiny models saved locally and uploaded as they are: name -> (local folder, s3 URI)."""
    import open_clip
    from safetensors.torch import save_file

    s3_server.make_bucket(BUCKET)
    root = tmp_path_factory.mktemp("models")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        s3_server.patch_env(mp)
        for kind, build in (("vit", _build_vision), ("bert", _build_text)):
            _ = build(kind, root / kind)
            made[kind] = root / kind
        clip = root / "clip"
        clip.mkdir()
        torch.manual_seed(0)
        save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), clip / "open_clip_model.safetensors")
        (clip / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": NORM})
        )
        made["clip"] = clip
        out = {}
        for kind, folder in made.items():
            uri = f"s3://{BUCKET}/models/{kind}"
            storage.upload_dir(folder, uri)
            out[kind] = (folder, uri)
    return out


@pytest.fixture
def node(s3_server, tmp_path, monkeypatch):
    """A fresh node: an empty HOME (default model cache under it) pointed at the S3 server.
    Calling it again moves to another fresh node."""
    s3_server.patch_env(monkeypatch)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    count = iter(range(100))

    def fresh() -> Path:
        home = tmp_path / f"node{next(count)}"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        return home / ".cache" / "raysys" / "models"

    return fresh


def _weights_under(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and is_weights(p.name))


@pytest.mark.parametrize(("kind", "modality"), [("vit", "image"), ("bert", "text")])
def test_hf_s3_folder_checks_without_weights_and_embeds_like_the_local_folder(
    kind: str, modality: str, models, node
) -> None:
    folder, uri = models[kind]
    rows = IMAGE_ROWS if modality == "image" else TEXT_ROWS
    local = get_backbone(f"hf:{folder}", modality, layers="0,-1")
    local.load(CPU)
    want = local.embed(_good(local.preprocess(rows)))

    driver = node()  # the CPU head: checks and keys the model, never loads it
    backbone = get_backbone(f"hf:{uri}", modality, layers="0,-1")
    backbone.check()
    described = backbone.describe()
    assert backbone.layer_ids == local.layer_ids and backbone.dims == local.dims
    assert (described["source"], described["revision"][:3]) == (uri, "s3:")
    assert str(driver.parent.parent.parent) not in json.dumps(described)
    assert _weights_under(driver) == []  # configs, tokenizer, processor only

    shipped = pickle.dumps(backbone)  # what Ray sends to tasks and actors
    cpu_node = node()  # a CPU task prepares inputs with the small files alone
    pre = pickle.loads(shipped).preprocess(rows)
    assert _weights_under(cpu_node) == []

    gpu_node = node()  # a fresh GPU node: the actor copies the weights, then loads them
    actor = pickle.loads(shipped)
    actor.load(CPU)
    got = actor.embed(_good(pre))
    assert _weights_under(gpu_node) == ["model.safetensors"]
    assert sorted(got) == sorted(want)
    for layer in want:
        np.testing.assert_array_equal(got[layer], want[layer])
    again = get_backbone(f"hf:{uri}", modality, layers="0,-1")
    assert cache.content_key(again.describe()) == cache.content_key(described)  # any node


def test_the_cache_key_follows_the_objects(models, node, tmp_path) -> None:
    """A re-uploaded folder (new ETags) is a new model: a new content key and a new local copy;
    an unchanged one is the same key on every node."""
    folder, _ = models["vit"]
    uri = f"s3://{BUCKET}/models/vit-mutable"
    storage.upload_dir(folder, uri)
    node()
    first = get_backbone(f"hf:{uri}", "image")
    key = cache.content_key(first.describe())
    first.load(CPU)

    node()
    assert cache.content_key(get_backbone(f"hf:{uri}", "image").describe()) == key
    from transformers import ViTModel

    model = ViTModel.from_pretrained(folder)  # the same architecture, new weights
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    storage.upload_file(resaved / "model.safetensors", f"{uri}/model.safetensors")
    changed = get_backbone(f"hf:{uri}", "image")
    assert cache.content_key(changed.describe()) != key
    changed.load(CPU)
    root = Path(os.environ["HOME"]) / ".cache" / "raysys" / "models"
    copies = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(copies) == 2  # the small files (unchanged) and the new full copy


def test_only_the_weights_transformers_reads_are_copied(models, node, tmp_path) -> None:
    """A sharded checkpoint copies its index's shards; other formats and stray checkpoints
    beside them (a .bin twin, TF weights, a sub-folder) stay on S3."""
    from transformers import ViTModel

    folder, _ = models["vit"]
    sharded = tmp_path / "sharded"
    ViTModel.from_pretrained(folder).save_pretrained(sharded, max_shard_size="40KB")
    shutil.copy(folder / "preprocessor_config.json", sharded)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    for stray in ("pytorch_model.bin", "tf_model.h5", "onnx/model.onnx"):
        (sharded / stray).parent.mkdir(exist_ok=True)
        (sharded / stray).write_bytes(b"never copied")
    uri = f"s3://{BUCKET}/models/vit-sharded"
    storage.upload_dir(sharded, uri)

    root = node()
    backbone = get_backbone(f"hf:{uri}", "image", layers="-1")
    backbone.check()
    backbone.load(CPU)
    local = get_backbone(f"hf:{folder}", "image", layers="-1")
    local.load(CPU)
    pre = _good(local.preprocess(IMAGE_ROWS))
    np.testing.assert_array_equal(backbone.embed(pre)["L02"], local.embed(pre)["L02"])
    assert _weights_under(root) == shards


COPY = """
import sys, time
from pathlib import Path
from raysys.backbones.fetch import RemoteFolder
folder = RemoteFolder(sys.argv[1], "race")
folder.files()
Path(sys.argv[3]).touch()  # listed, ready to copy
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
print("PATH", folder.local_copy(folder.files()), flush=True)
"""


def test_two_loads_on_one_node_copy_once(models, node, tmp_path) -> None:
    """Two processes (two actors on one node) released together: one copies, the other waits
    and reads the finished copy; nothing half-copied or temporary is left."""
    uri = f"s3://{BUCKET}/models/big"
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    (big / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(8_000_000))
    storage.upload_dir(big, uri)
    root = node()
    go, ready = tmp_path / "go", [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COPY, uri, str(go), str(flag)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    text = "".join(outs)
    assert text.count("[model] race: copying 2 files") == 1, text
    assert text.count("[model] race: copied in") == 1, text
    paths = {line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("PATH ")}
    assert len(paths) == 1
    copy = Path(paths.pop())
    assert copy.parent == root
    assert (copy / "model.safetensors").read_bytes() == (big / "model.safetensors").read_bytes()
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [copy.name]


def test_missing_folder_or_weights_is_a_clear_error(models, node, tmp_path) -> None:
    node()
    for uri in (f"s3://{BUCKET}/models/no-such-model", "s3://no-such-bucket-xyz/models/vit"):
        with pytest.raises(BackboneError) as err:
            get_backbone(f"hf:{uri}", "image").check()
        assert f"no model folder at {uri}" in str(err.value)
        assert f"aws s3 sync ./my-model {uri}" in str(err.value)

    folder, _ = models["vit"]
    partial = tmp_path / "no-weights"
    partial.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, partial)
    uri = f"s3://{BUCKET}/models/no-weights"
    storage.upload_dir(partial, uri)
    backbone = get_backbone(f"hf:{uri}", "image")
    with pytest.raises(BackboneError, match=f"folder {uri} has no model.safetensors or"):
        backbone.check()
    with pytest.raises(BackboneError, match="upload the whole folder"):
        backbone.load(CPU)

    clip, _ = models["clip"]
    uri = f"s3://{BUCKET}/models/clip-no-weights"
    storage.upload_file(clip / "open_clip_config.json", f"{uri}/open_clip_config.json")
    with pytest.raises(BackboneError, match=f"no weights .* in {uri}; upload the weights"):
        get_backbone(f"open_clip:s3://{uri[5:]}", "image").check()
    with pytest.raises(BackboneError, match="only as a whole open_clip folder"):
        get_backbone(f"open_clip:ViT-B-32:s3://{BUCKET}/w.safetensors", "image")


def test_open_clip_s3_folder_embeds_like_the_local_folder(models, node) -> None:
    folder, uri = models["clip"]
    local = get_backbone(f"open_clip:local-dir:{folder}", "image", layers="0,2")
    local.load(CPU)
    want = local.embed(_good(local.preprocess(IMAGE_ROWS)))

    driver = node()
    spellings = [f"open_clip:{uri}", f"open_clip:local-dir:{uri}"]
    backbones = [get_backbone(name, "image", layers="0,2") for name in spellings]
    for backbone in backbones:
        backbone.check()
        assert backbone.describe()["source"] == uri
    text = get_backbone(spellings[0], "text")
    text.check()
    assert text.preprocess(TEXT_ROWS)["input_ids"].shape == (3, 16)  # tokenizer from S3 files
    assert backbones[0].param_count() == local.param_count()  # the scale axis, from the config
    assert _weights_under(driver) == []

    gpu_node = node()
    actor = pickle.loads(pickle.dumps(backbones[0]))
    actor.load(CPU)
    got = actor.embed(_good(actor.preprocess(IMAGE_ROWS)))
    assert _weights_under(gpu_node) == ["open_clip_model.safetensors"]
    for layer in want:
        np.testing.assert_array_equal(got[layer], want[layer])


# --- the Hub: online where the environment allows it, offline as today -----------------------


def _fake_hub_cache(folder: Path, hub: Path) -> str:
    """`folder` as the HF cache holds a downloaded hub repo `tiny/vit` at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--tiny--vit"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def online(monkeypatch, tmp_path, s3_server):
    """The Hub allowed (HF_HUB_OFFLINE unset, as on a cluster node), its endpoint a real HTTP
    server on 127.0.0.1 that holds no models (the S3 server: every repo is "not found"), and an
    empty HF cache. Nothing leaves the machine."""
    import huggingface_hub

    constants = huggingface_hub.constants
    endpoint = s3_server.endpoint_url
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_hub_ids_resolve_from_the_cache_only(models) -> None:
    from raysys.backbones.hfsource import HFSource

    assert HFSource("tiny/vit").kwargs() == {"revision": None, "local_files_only": True}
    # A node offline where the driver pinned a commit online loads that commit, not whichever
    # snapshot its own cache holds.
    pinned = HFSource("tiny/vit")
    pinned.commit = "0123abcd"
    assert pinned.kwargs() == {"revision": "0123abcd", "local_files_only": True}
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set.*hf:s3://bucket/prefix"):
        get_backbone("hf:nobody/no-such-model", "image").check()


def test_online_hub_ids_may_download_and_pin_the_drivers_commit(models, online) -> None:
    """Online, a hub id is not refused for missing from this machine's cache: it is fetched
    (here the Hub is unreachable, so the check says so and names the alternatives), and a
    model the driver resolved is loaded at the driver's commit everywhere."""
    from raysys.backbones.hfsource import HFSource

    source = HFSource("tiny/vit@v1")
    assert source.kwargs() == {"revision": "v1"}  # no local_files_only: actors may download
    with pytest.raises(BackboneError) as err:
        get_backbone("hf:nobody/no-such-model", "image").check()
    message = str(err.value)
    assert "cannot get config.json of nobody/no-such-model from the Hugging Face Hub" in message
    assert "hf:s3://bucket/prefix" in message and "HF_HUB_OFFLINE=1" in message

    folder, _ = models["vit"]
    commit = _fake_hub_cache(folder, online)  # what the driver has (or just fetched)
    backbone = get_backbone("hf:tiny/vit", "image", layers="-1")
    backbone.check()  # in this machine's cache: no request at all
    assert backbone.describe()["revision"] == commit
    shipped = pickle.loads(pickle.dumps(backbone))
    assert shipped.source.kwargs() == {"revision": commit}  # every actor loads that commit
    shipped.load(CPU)
    assert shipped.embed(_good(shipped.preprocess(IMAGE_ROWS)))["L02"].shape == (3, 32)


def test_backbones_leave_the_offline_switch_alone(models, monkeypatch) -> None:
    """Loading a model no longer turns HF_HUB_OFFLINE on: on a cluster node it stays unset."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder, _ = models["bert"]
    backbone = get_backbone(f"hf:{folder}", "text")
    backbone.load(CPU)
    backbone.preprocess(TEXT_ROWS)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_remote_folder_lists_top_level_files(models, node) -> None:
    node()
    _, uri = models["vit"]
    folder = RemoteFolder(uri, "hf:" + uri)
    assert "model.safetensors" in folder.files()
    assert "model.safetensors" not in folder.small_files()
    assert folder.version(["config.json"]) != folder.version(["config.json", "model.safetensors"])


def test_threads_of_one_process_copy_once_too(models, node, capsys) -> None:
    """Eight threads (actors sharing a worker process) ask for one folder at once."""
    from concurrent.futures import ThreadPoolExecutor

    _, uri = models["bert"]
    root = node()
    folder = RemoteFolder(uri, "threads")
    folder.files()
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: folder.local_copy(folder.files()), range(8)))
    assert len(paths) == 1 and capsys.readouterr().out.count("threads: copying") == 1
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [
        paths.pop().name
    ]


def test_hub_failures_say_which_case_it_is() -> None:
    """An unreachable Hub (huggingface_hub retries for about 25 s, then raises this) reads
    differently from a missing repo or file; each names the ways round the Hub."""
    from huggingface_hub import errors

    from raysys.backbones.fetch import hub_error

    unreachable = errors.LocalEntryNotFoundError("not in the cache")
    unreachable.__cause__ = ConnectionRefusedError(111, "Connection refused")
    message = str(hub_error("hf:org/m", "org/m", "config.json", unreachable))
    assert "the Hub could not be reached (ConnectionRefusedError" in message
    assert "hf:s3://bucket/prefix" in message and "HF_HUB_OFFLINE=1" in message
    missing = str(hub_error("hf:org/m", "org/m", "config.json", errors.EntryNotFoundError("")))
    assert "the repo has no config.json" in missing
