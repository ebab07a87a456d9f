"""Run directories: where a command writes, local or `s3://`, and how a stopped run resumes.

An `s3://` output is written in a local staging directory and uploaded when the command
ends; what Ray Train and Tune write (checkpoints, the experiment) goes to the URI directly.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raysys import config, storage
from raysys.config import Config
from raysys.errors import ConfigError

CONFIG_FILE = "config.yaml"
RUN_MARKERS = ("results.csv", "ray", "models", "tune")  # a directory holding any is a run


@dataclass
class RunDir:
    """Where a run's files are written (`local`) and where they end up (`uri`, if remote)."""

    local: Path
    uri: str | None = None

    def remote(self, *parts: str) -> str | None:
        """A path under the URI, for what Ray writes straight to object storage."""
        return storage.join(self.uri, *parts) if self.uri else None

    def finish(self) -> None:
        """Upload a staged run to its URI (a local run is already in place)."""
        if self.uri:
            storage.upload_dir(self.local, self.uri)
            shutil.rmtree(self.local, ignore_errors=True)


def default_out(command: str, out: str | None, cfg: Config) -> Path | str:
    """`--out` as given (a path or `s3://`), else `runs/<name or command-time>`."""
    if out:
        return out if storage.is_remote(out) else Path(out)
    return Path("runs") / (cfg.name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def resumed_config(cfg: Config, overrides: list[str]) -> tuple[Config, Path]:
    """The config saved in the run `resume=` names, with the other overrides on top (e.g.
    more epochs): the run's own config is the base."""
    out = Path(cfg.resume)
    saved = out / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not a run directory (no {CONFIG_FILE})")
    return config.load(saved, [o for o in overrides if not o.startswith("resume=")]), out


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


def open_run(
    cfg: Config, out: Path | str, resume: bool, kind: str = "run", marker: str = "results.csv"
) -> RunDir:
    """The run directory of a `train` (`kind` run) or `sweep`, checked before any work: a
    remote one must be writable and new (`marker` names what a finished one holds), a
    resumed one must exist; a new one gets the resolved config."""
    uri = None
    if storage.is_remote(out):
        uri = str(out)
        if resume:
            raise ConfigError(
                f"resume= needs a local {kind} directory; s3:// resume is not supported"
            )
        storage.check_writable(uri)
        if storage.exists(storage.join(uri, marker)):
            raise ConfigError(f"{uri!r} already holds a {kind}; choose another --out")
        out = tempfile.mkdtemp(prefix=f"raysys-{kind}-")
    if not resume:
        prepare_out_dir(Path(out))  # its message names the directory as the user gave it
        config.dump(cfg, Path(out) / CONFIG_FILE)
    return RunDir(Path(out).resolve(), uri)


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
