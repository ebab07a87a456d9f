"""`raysys <command> [--config FILE.yaml] [--out DIR] [dotted.key=value …]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from raysys import config, rundir
from raysys.bench import cli as bench
from raysys.config import Config
from raysys.errors import ConfigError, Interrupted, RaysysError

COMMANDS = {
    "run": "the whole pipeline on the embedded defaults: synthetic corpus, offline backbones, "
    "extract, a small sweep (every objective x 2 layer depths x EfficientNet-Lite0/1 vs "
    "MiniLM), report",
    "extract": "corpus -> embedding cache (Parquet, every layer), reused when unchanged",
    "train": "one JAM training run (train.objective) on the cached embeddings, then its report",
    "sweep": "a Ray Tune sweep over objectives x layer pairs x model pairs x train.* params "
    "(sweep.*), then its report (results.csv, report.md, pareto/layers/scale PNGs)",
    "probe": "the passive-metric study (the paper's Fig. 1): matching / easy / hard pairs "
    "scored by CCA, CKA, SVCCA, CKNNA, mutual kNN after linear and RBF PCA, raw and JAM "
    "(probe.models=<run dir>); probe.csv, alignment.csv, probe.png, alignment.png",
    "evaluate": "score an exported model (runs/<run>/models/<objective>) on a corpus's cache",
    "report": "rebuild report.md (and a sweep's plots) from a finished run or sweep "
    "directory's results.csv",
    "bench": "throughput of a stage against a bare PyTorch loop on the same work (bench.json)",
}

EPILOG = """\
overrides:
  Any config key as dotted key=value after the command, e.g.
    raysys run corpus.size=500 train.epochs=3
    raysys train train.objective=spread train.alpha=0.7 train.vision_layer=12
    raysys sweep sweep.models=efficientnet-lite0+minilm-l6,efficientnet-lite2+minilm-l6 \
        sweep.layers=0.5:0.5,1.0:1.0 'sweep.params.train.lr=[0.001,0.0003]'
  Sections: corpus.*, extract.*, train.*, eval.*, probe.*, ray.*, sweep.*, plus `objectives`,
  `name` and `resume`.
  `resume=DIR` (or `resume=s3://BUCKET/PREFIX`, from any machine) continues a stopped run,
  train or sweep from its checkpoints (finished trials are not rerun).
  `raysys run --show-config` prints every key with its default.

cluster:
  With RAY_ADDRESS set (ray job submit sets it) raysys joins that cluster; otherwise it starts
  a private local Ray bound to 127.0.0.1. On a cluster of several nodes (or whose driver node
  has no CPUs) run, train and sweep need --out s3://BUCKET/PREFIX: no node sees another's disk.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysys",
        description="JAM alignment of frozen vision and language models, distributed on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "report":
            p.add_argument(
                "run_dir", type=Path, help="a run or sweep directory holding results.csv"
            )
            continue
        if name == "evaluate":
            p.add_argument("model_dir", type=Path, help="an exported model directory")
        if name == "bench":
            bench.add_arguments(p)
        p.add_argument("--config", type=Path, help="YAML file of config keys (nested sections)")
        p.add_argument(
            "--out",
            help="the embedding cache directory (default extract.cache_dir)"
            if name == "extract"
            else "output directory (default runs/<command>-<timestamp>/)",
        )
        p.add_argument(
            "--show-config", action="store_true", help="print the resolved config and exit"
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _commands():
    """The commands module, imported once a command line parsed: it imports torch and Ray
    (2.5 s on 2 cores), which `--help` and a mistyped argument should not wait for."""
    return importlib.import_module("raysys.commands")


@dataclass
class Invocation:
    """A parsed command line: its arguments, the resolved config, and for the commands that
    write a run directory, which one (`out`) and whether it continues a stopped run."""

    args: argparse.Namespace
    cfg: Config
    out: Path | str = ""
    resume: bool = False


def _run(inv: Invocation) -> None:
    with_probe = inv.args.command == "run"  # `raysys run` is the whole study, probe included
    _commands().sweep(inv.cfg, inv.out, resume=inv.resume, with_probe=with_probe)


def _train(inv: Invocation) -> None:
    _commands().train(inv.cfg, inv.out, resume=inv.resume)


def _evaluate(inv: Invocation) -> None:
    args = inv.args
    out = rundir.default_out(args.command, args.out, inv.cfg) if args.out else None
    _commands().evaluate(inv.cfg, args.model_dir, out)


def _probe(inv: Invocation) -> None:
    out = rundir.default_out(inv.args.command, inv.args.out, inv.cfg)
    if not isinstance(out, Path):
        raise ConfigError("probe writes a local --out directory")
    importlib.import_module("raysys.probe").probe(inv.cfg, out)
    print(f"outputs:     {out}/ (probe.csv, alignment.csv, probe.png, alignment.png, probe.md)")


def _extract(inv: Invocation) -> None:
    _commands().extract_cache(inv.cfg, inv.args.out)


def _bench(inv: Invocation) -> None:
    out = rundir.default_out(inv.args.command, inv.args.out, inv.cfg)
    if not isinstance(out, Path):
        raise ConfigError("bench writes a local --out directory")
    bench.run(inv.args, inv.cfg, out)
    print(f"outputs:     {out}/{bench.BENCH_FILE}")


# What each command does with its resolved config (`report` takes no config).
DISPATCH: dict[str, Callable[[Invocation], None]] = {
    "run": _run,
    "sweep": _run,
    "train": _train,
    "evaluate": _evaluate,
    "probe": _probe,
    "extract": _extract,
    "bench": _bench,
}
WRITES_RUN_DIR = ("run", "sweep", "train")  # print where the outputs are and the time taken


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    # argparse gives a `nargs="*"` positional only the words before the first option, so
    # `raysys bench step --pairs 9 key=value` would reject key=value; collect such strays.
    args, stray = parser.parse_known_args(argv)
    unknown = [a for a in stray if a.startswith("-") or "=" not in a]
    if unknown or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or stray)}")
    if stray:
        args.overrides = [*args.overrides, *stray]
    return args


def _invocation(args: argparse.Namespace) -> Invocation:
    """The command's config (file + overrides, checked) and, for the commands that write a
    run directory, which one: `resume=DIR` continues DIR with its own saved config as the
    base the other overrides apply to."""
    cfg = config.load(args.config, args.overrides)
    given = config.given_keys(args.config, args.overrides)
    cfg = config.for_command(args.command, cfg, given)
    if args.command not in WRITES_RUN_DIR:
        return Invocation(args, cfg)
    if cfg.resume:
        cfg, out = rundir.resumed_config(cfg, args.overrides, args.command, args.config)
        return Invocation(args, cfg, out, resume=True)
    return Invocation(args, cfg, rundir.default_out(args.command, args.out, cfg))


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = _parse(argv)
    try:
        if args.command == "report":
            # Not through `commands`: a report needs neither Ray nor torch (0.5 s to load).
            importlib.import_module("raysys.report.report").rebuild(args.run_dir)
            return 0
        inv = _invocation(args)
        if args.show_config:
            print(yaml.safe_dump(config.to_dict(inv.cfg), sort_keys=False), end="")
            return 0
        DISPATCH[args.command](inv)
        if args.command in WRITES_RUN_DIR:
            rundir.print_where(inv.out)
            print(f"elapsed:     {time.perf_counter() - started:.0f} s ({args.command})")
        return 0
    except RaysysError as exc:
        print(f"raysys: error: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, Interrupted) else 2
    except KeyboardInterrupt:  # Ctrl-C outside a sweep's Tune run (which says what to resume)
        print("raysys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
