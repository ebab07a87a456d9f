"""`raysys <command> [--config FILE.yaml] [--out DIR] [dotted.key=value …]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raysys import config
from raysys.config import Config
from raysys.errors import ConfigError, RaysysError

COMMANDS = {
    "run": "the whole pipeline on the embedded defaults: synthetic corpus, offline backbones, "
    "extract, a small sweep (every objective x 2 layer depths x EfficientNet-Lite0/1 vs "
    "MiniLM), report",
    "extract": "corpus -> embedding cache (Parquet, every layer), reused when unchanged",
    "train": "one JAM training run (train.objective) on the cached embeddings, then its report",
    "sweep": "a Ray Tune sweep over objectives x layer pairs x model pairs x train.* params "
    "(sweep.*), then its report (results.csv, report.md, pareto/layers/scale PNGs)",
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
        sweep.layers=0.5:0.5,1.0:1.0 sweep.params.train.lr=[0.001,0.0003]
  Sections: corpus.*, extract.*, train.*, eval.*, ray.*, sweep.*, plus `objectives`.
  `resume=DIR` continues a stopped run, train or sweep (finished trials are not rerun).
  `raysys run --show-config` prints every key with its default.

cluster:
  With RAY_ADDRESS set (ray job submit sets it) raysys joins that cluster; otherwise it starts
  a private local Ray bound to 127.0.0.1.
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
            p.add_argument(
                "stage",
                choices=["train", "step", "extract", "embed", "sweep"],
                help="train: Ray Train vs a bare loop on the cache; step: the training step "
                "alone (no Ray) on random embeddings held on the device; extract: the Ray "
                "Data image pass vs a bare loop over pre-decoded images; embed: the extract "
                "actor's batch function (no Ray) vs a bare forward, ViT-B/16 and BERT-base; "
                "sweep: identical small trials one at a time vs packed by the sweep",
            )
            p.add_argument("--images", type=int, default=1000, help="extract: images embedded")
            p.add_argument("--rows", type=int, default=256, help="embed: rows per modality")
            p.add_argument("--trials", type=int, default=4, help="sweep: identical trials")
            p.add_argument("--pairs", type=int, default=200_000, help="step: pairs on device")
            p.add_argument("--dims", default="1024,4096", help="step: image,text embedding widths")
            p.add_argument("--steps", type=int, default=50, help="step: timed steps")
            p.add_argument("--device", default="auto", help="step, embed: auto, cpu, cuda, …")
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


def _bench_step(args: argparse.Namespace, cfg: Config, out: Path) -> None:
    from raysys.bench_step import StepBench, bench_step

    try:
        d_image, d_text = (int(d) for d in args.dims.split(","))
    except ValueError:
        raise ConfigError(f"--dims {args.dims!r} must be two widths, e.g. 1024,4096") from None
    if min(args.pairs, args.steps, d_image, d_text) < 1 or args.pairs < cfg.train.batch_size:
        raise ConfigError(
            f"--pairs ({args.pairs}) must hold a global batch (train.batch_size="
            f"{cfg.train.batch_size}); --steps and --dims must be positive"
        )
    bench = StepBench(args.pairs, d_image, d_text, steps=args.steps, device=args.device)
    bench_step(cfg, out, bench)


def run_defaults(cfg: Config, given: set[str]) -> Config:
    """`raysys run`'s small sweep, for whatever the user did not set: EfficientNet-Lite0 and
    Lite1 (two scales) against MiniLM, at half and full depth, with a narrower JAM (hidden
    256, 256) so the 12 trials fit in 10 minutes on 2 cores."""
    from raysys.sweep import RUN_HIDDEN, RUN_LAYERS, RUN_MODELS

    if not given & {"sweep.models", "extract.vision", "extract.text"}:
        cfg.sweep.models = list(RUN_MODELS)
    layer_keys = {"sweep.layers", "sweep.vision_depths", "sweep.text_depths"}
    if not given & (layer_keys | {"train.vision_layer", "train.text_layer"}):
        cfg.sweep.layers = list(RUN_LAYERS)
    if "train.hidden" not in given:
        cfg.train.hidden = list(RUN_HIDDEN)
    return cfg


def _out_dir(args: argparse.Namespace, cfg: Config) -> Path | str:
    if args.out:
        return args.out if args.out.startswith("s3://") else Path(args.out)
    name = cfg.name or f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


def _where(out: Path | str) -> None:
    print(f"outputs:     {out}/ (config.yaml, results.csv, report.md, models/)")
    if str(out).startswith("s3://"):
        print(
            f"tensorboard: aws s3 sync {out}/tensorboard runs/tb && "
            "tensorboard --logdir runs/tb --host 127.0.0.1"
        )
    else:
        print(f"tensorboard: tensorboard --logdir {Path(out) / 'tensorboard'} --host 127.0.0.1")


def _evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from raysys.pipeline import evaluate_model
    from raysys.report import table, write_report, write_results

    rows = evaluate_model(cfg, args.model_dir)
    print("\n" + table(rows) + "\n")
    if args.out:
        out = _out_dir(args, cfg)
        if not isinstance(out, Path):
            raise ConfigError("evaluate writes a local --out directory")
        out.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, out / "config.yaml")
        write_results(out, rows)
        write_report(out, rows, notes=[f"Model {args.model_dir}, {cfg.eval.split} split."])
        print(f"outputs:     {out}/ (config.yaml, results.csv, report.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = _parser()
    # argparse gives a `nargs="*"` positional only the words before the first option, so
    # `raysys bench step --pairs 9 key=value` would reject key=value; collect such strays.
    args, stray = parser.parse_known_args(argv)
    unknown = [a for a in stray if a.startswith("-") or "=" not in a]
    if unknown or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or stray)}")
    if stray:
        args.overrides = [*args.overrides, *stray]
    try:
        if args.command == "report":
            from raysys.report import (
                SWEEP_SHOWN,
                is_sweep,
                read_results,
                table,
                write_report,
                write_sweep_report,
            )

            rows = read_results(args.run_dir)
            if is_sweep(rows):
                path = write_sweep_report(args.run_dir, rows)
                print(table(rows, SWEEP_SHOWN))
            else:
                path = write_report(args.run_dir, rows)
                print(table(rows))
            print(f"\nreport: {path}")
            return 0
        cfg = config.load(args.config, args.overrides)
        given = config.given_keys(args.config, args.overrides)
        if args.command in ("run", "sweep") and "train.objective" in given:
            raise ConfigError(
                f"{args.command} trains every entry of `objectives`; set objectives="
                f"{cfg.train.objective} instead of train.objective"
            )
        if args.command == "run":
            cfg = run_defaults(cfg, given)
        if args.show_config:
            import yaml

            print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "extract":
            from raysys.extract import extract

            if args.out:  # extract's output is the cache itself (a path or s3://)
                cfg.extract.cache_dir = args.out
            ext = extract(cfg)
            print(f"cache: {ext.image_dir}\n       {ext.text_dir}")
            return 0
        if args.command == "evaluate":
            return _evaluate(args, cfg)
        if args.command == "bench":
            out = _out_dir(args, cfg)
            if not isinstance(out, Path):
                raise ConfigError("bench writes a local --out directory")
            if args.stage == "step":
                _bench_step(args, cfg, out)
            elif args.stage == "extract":
                from raysys.bench_extract import bench_extract

                bench_extract(cfg, out, args.images)
            elif args.stage == "sweep":
                from raysys.bench_sweep import bench_sweep

                if args.trials < 2:
                    raise ConfigError(f"--trials must be >= 2, got {args.trials}")
                bench_sweep(cfg, out, args.trials)
            elif args.stage == "embed":
                from raysys.bench_embed import bench_embed

                if args.rows < 1:
                    raise ConfigError(f"--rows must be >= 1, got {args.rows}")
                bench_embed(out, args.device, args.rows, cfg.extract.batch_size)
            else:
                from raysys.bench import bench_train

                bench_train(cfg, out)
            print(f"outputs:     {out}/bench.json")
            return 0
        resume = bool(cfg.resume)
        if resume:
            out = Path(cfg.resume)
            saved = out / "config.yaml"
            if not saved.is_file():
                raise ConfigError(f"resume={cfg.resume!r} is not a run directory (no config.yaml)")
            # Overrides still apply on top (e.g. more epochs); the run's own config is the base.
            cfg = config.load(saved, [o for o in args.overrides if not o.startswith("resume=")])
        else:
            out = _out_dir(args, cfg)
        if args.command in ("run", "sweep"):
            from raysys.sweep import sweep

            sweep(cfg, out, resume=resume)
        else:
            from raysys.pipeline import run

            run(cfg, out, [cfg.train.objective], resume=resume)
        _where(out)
        print(f"elapsed:     {time.perf_counter() - started:.0f} s ({args.command})")
        return 0
    except RaysysError as exc:
        print(f"raysys: error: {exc}", file=sys.stderr)
        from raysys.sweep import Interrupted

        return 130 if isinstance(exc, Interrupted) else 2


if __name__ == "__main__":
    sys.exit(main())
