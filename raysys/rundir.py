"""Run directories: where a command writes, local or `s3://`, and how a stopped run resumes.

An `s3://` output is written in a local staging directory and uploaded when the command
ends; what Ray Train and Tune write (checkpoints, the experiment) goes to the URI directly, so
`resume=s3://…` continues a run from any machine. On a cluster of several nodes only such a
URI works: a worker elsewhere cannot see the driver's disk.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raysys import config, storage
from raysys.config import Config
from raysys.errors import ConfigError, RaysysError

CONFIG_FILE = "config.yaml"
RUN_MARKERS = ("results.csv", "ray", "models", "tune")  # a directory holding any is a run


@dataclass
class RunDir:
    """Where a run's files are written (`local`) and where they end up (`uri`, if remote)."""

    local: Path
    uri: str | None = None

    @property
    def root(self) -> Path | str:
        """Where the run ends up: its URI, else its local directory."""
        return self.uri or self.local

    def remote(self, *parts: str) -> str | None:
        """A path under the URI, for what Ray writes straight to object storage."""
        return storage.join(self.uri, *parts) if self.uri else None

    def finish(self) -> None:
        """Upload a staged run to its URI (a local run is already in place): `results.csv`,
        the mark of a finished run, last, so an upload that fails part-way never looks
        finished; on a failure the staged copy is kept, and named."""
        if not self.uri:
            return
        try:
            storage.upload_dir(self.local, self.uri, last="results.csv")
        except OSError as err:
            raise RaysysError(
                f"uploading the run to {self.uri!r} failed ({type(err).__name__}: {err}); its "
                f"files are kept in {str(self.local)!r}: copy them there, or rerun"
            ) from None
        shutil.rmtree(self.local, ignore_errors=True)


def default_out(command: str, out: str | None, cfg: Config) -> Path | str:
    """`--out` as given (a path or `s3://`), else `runs/<name or command-time>`."""
    if out:
        return out if storage.is_remote(out) else Path(out)
    return Path("runs") / (cfg.name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


# What a resumed sweep (`run` or `sweep`) may still be given: where and how Ray runs. Its
# finished trials were trained and scored with the rest, and the report compares them.
SWEEP_RESUME_KEYS = ("ray.", "train.data_on_device")  # the latter: how a split is read


def resumed_config(
    cfg: Config, overrides: list[str], command: str = "train", config_file: str | None = None
) -> tuple[Config, Path | str]:
    """The config saved in the run `resume=` names (a directory or an `s3://` URI), with the
    other overrides on top (a train run's e.g. more epochs; a sweep's only `ray.*`): the
    run's own config is the base, so a `--config` file would be ignored, and is refused."""
    out: Path | str = cfg.resume if storage.is_remote(cfg.resume) else Path(cfg.resume)
    rest = [o for o in overrides if not o.startswith("resume=")]
    if config_file is not None:
        raise ConfigError(
            f"resume={cfg.resume!r} continues with the run's own config.yaml; --config "
            f"{config_file!r} would not be applied: leave it out"
        )
    changed = [o for o in rest if not o.partition("=")[0].strip().startswith(SWEEP_RESUME_KEYS)]
    if command in ("run", "sweep") and changed:
        raise ConfigError(
            f"a resumed sweep keeps the config it started with (its finished trials were "
            f"trained and scored with it, and the report compares them); it takes only "
            f"ray.* and train.data_on_device overrides, not {' '.join(changed)}. Start a new "
            "sweep to change them"
        )
    if not storage.is_remote(out):
        saved = Path(out) / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"resume={cfg.resume!r} is not a run directory (no {CONFIG_FILE})")
        return config.load(saved, rest), out
    storage.check_readable(out, "resume")  # a wrong bucket or endpoint fails in seconds
    try:
        text = storage.read_text(storage.join(out, CONFIG_FILE))
    except FileNotFoundError:
        raise ConfigError(f"resume={cfg.resume!r} is not a run (no {CONFIG_FILE})") from None
    with tempfile.TemporaryDirectory(prefix="raysys-resume-") as tmp:
        saved = Path(tmp) / CONFIG_FILE
        saved.write_text(text)
        return config.load(saved, rest), out


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse to reuse a finished run's directory: Ray Train would resume its old
    checkpoints and the new results would silently be the old model's."""
    used = [n for n in RUN_MARKERS if (out_dir / n).exists()]
    if used:
        raise ConfigError(
            f"{str(out_dir)!r} already holds a run ({', '.join(used)}); choose another --out "
            "or delete it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def open_run(cfg: Config, out: Path | str, resume: bool, kind: str = "run") -> RunDir:
    """The run directory of a `train` (`kind` run) or `sweep`, checked before any work: a
    remote one must be writable and new (none of `RUN_MARKERS`, as a local one) unless
    resumed, a local one must be one the cluster's nodes can all reach, a resumed one must
    exist; a new one gets the resolved config."""
    uri = None
    if storage.is_remote(out):
        uri = str(out)
        storage.check_writable(uri)
        # Any run's files, not only a finished one's results: a stopped run leaves Ray Train's
        # checkpoints (or Tune's state), which a new run of the same name would resume from.
        # A config alone (a run stopped before training, e.g. while extracting) is rewritten.
        held = sorted(set(storage.list_names(uri)) & set(RUN_MARKERS))
        if not resume and held:
            raise ConfigError(
                f"{uri!r} already holds a {kind} ({', '.join(held)}); choose another --out, "
                f"or continue a stopped one with resume={uri}"
            )
        # Staged here, uploaded by `finish`; a resumed run's files already there are kept.
        out = tempfile.mkdtemp(prefix=f"raysys-{kind}-")
    else:
        check_local_out(cfg, out, kind)
    if not resume:
        prepare_out_dir(Path(out))  # its message names the directory as the user gave it
        config.dump(cfg, Path(out) / CONFIG_FILE)
        if uri:  # now, not at the end: a run whose driver dies must still be resumable
            storage.upload_file(Path(out) / CONFIG_FILE, storage.join(uri, CONFIG_FILE))
    return RunDir(Path(out).resolve(), uri)


def check_local_out(cfg: Config, out: Path | str, kind: str = "run") -> None:
    """Refuse a local `--out` on a cluster whose work runs on other nodes: Ray Train keeps
    checkpoints under it, and another node cannot see this machine's disk (the run would fail
    late, or lose its outputs with the node)."""
    shape = _joined_cluster_shape(cfg)
    refusal = shape and local_out_refusal(out, kind, *shape)
    if refusal:
        raise ConfigError(refusal)


def check_local_cache(cfg: Config) -> None:
    """Refuse a local `extract.cache_dir` on such a cluster too: the extraction actors write
    their parts to it on their own nodes, and the driver and the training workers would look
    for them on theirs."""
    if storage.is_remote(cfg.extract.cache_dir):
        return
    shape = _joined_cluster_shape(cfg)
    refusal = shape and local_cache_refusal(cfg.extract.cache_dir, *shape)
    if refusal:
        raise ConfigError(refusal)


def _joined_cluster_shape(cfg: Config) -> tuple[int, float] | None:
    """(alive nodes, driver CPUs) of the cluster the work will run on, or None when it is a
    private local Ray: only a joined cluster (`RAY_ADDRESS`, or Ray already initialised by
    the caller) is asked; a private local Ray is one node, this one."""
    if not _ray_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return None
        from raysys.runtime import init_ray  # joins the cluster the work will run on

        init_ray(cfg.ray)
    return _cluster_shape()


def _work_elsewhere(nodes: int, driver_cpus: float) -> str | None:
    """Why tasks and workers may run on nodes other than this driver's, or None: more than
    one node, or a driver node without CPUs (a head like cluster/gpu.yaml's, where every
    task and worker runs on nodes that may not even exist yet)."""
    if nodes > 1:
        return f"the Ray cluster has {nodes} nodes"
    if driver_cpus <= 0:
        return "this driver's Ray node has no CPUs, so the work runs on other nodes"
    return None


def local_out_refusal(out: Path | str, kind: str, nodes: int, driver_cpus: float) -> str | None:
    """Why a local output directory cannot hold a `kind` on this cluster, or None when it can
    (see `_work_elsewhere`)."""
    reason = _work_elsewhere(nodes, driver_cpus)
    if reason is None:
        return None
    return (
        f"--out {str(out)!r} is a local directory, but {reason}: Ray Train's checkpoints and "
        f"the models and TensorBoard files of this {kind} would land on disks this machine "
        "cannot see. Write to object storage instead: --out s3://BUCKET/PREFIX"
    )


def local_cache_refusal(cache_dir: str, nodes: int, driver_cpus: float) -> str | None:
    """Why a local embedding cache cannot serve this cluster, or None when it can (see
    `_work_elsewhere`)."""
    reason = _work_elsewhere(nodes, driver_cpus)
    if reason is None:
        return None
    return (
        f"extract.cache_dir {cache_dir!r} is a local directory, but {reason}: the extraction "
        "actors would write the embeddings to their own nodes' disks, where neither this "
        "driver nor the training workers find them. Put the cache on object storage instead: "
        "extract.cache_dir=s3://BUCKET/PREFIX"
    )


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # not imported by this module: `--help` must stay light
    return bool(ray is not None and ray.is_initialized())


def _cluster_shape() -> tuple[int, float]:
    """(alive nodes, CPUs of the node this driver runs on) of the joined cluster."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    cpus = sum(float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive if n["NodeID"] == here)
    return len(alive), cpus


def print_where(out: Path | str) -> None:
    """Where the outputs are and how to open them in TensorBoard."""
    print(f"outputs:     {out}/ (config.yaml, results.csv, report.md, models/)")
    if storage.is_remote(out):
        print(
            f"tensorboard: aws s3 sync {out}/tensorboard runs/tb && "
            "tensorboard --logdir runs/tb --host 127.0.0.1"
        )
    else:
        print(f"tensorboard: tensorboard --logdir {Path(out) / 'tensorboard'} --host 127.0.0.1")
