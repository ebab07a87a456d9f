"""Train: one JAM run over cached embeddings, as a Ray Train `TorchTrainer` (DDP).

The compute lives in `Trainer`, a plain class that runs one training step or a validation on
one process with or without torch.distributed; `train_loop` is the thin Ray Train wrapper
around it (data loading, reporting, checkpoints, TensorBoard on rank 0). `BatchPlan` cuts
the train split into fixed shards; each rank reads only its shards and takes an equal slice
of each global batch from them, and contrastive terms see the whole global batch through
`gather_with_grad`, so N workers × B/N train the same objective as 1 worker × B.
A split too large for the workers' memory streams instead (`raysys.stream`): Ray Data joins
it once into a pair view and Ray Train gives each worker an equal share per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raysys.config import Config, TrainConfig, from_dict, to_dict
from raysys.errors import CacheError, RaysysError
from raysys.evaluate import score_model
from raysys.jam import JAM, JAMConfig, losses
from raysys.jam.dist import gather_with_grad

if TYPE_CHECKING:  # the step itself runs without the cache (pyarrow), e.g. `bench step`
    from raysys import cache

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # every report so far; the latest checkpoint holds all of it
MODEL_DIR = "model"


@dataclass
class Paths:
    """The cache directories a run reads (plain strings: they cross process boundaries)."""

    corpus_dir: str
    image_dir: str
    text_dir: str
    image_layer: str
    text_layer: str

    def _args(self) -> tuple[Path, Path, Path, str, str]:
        dirs = (Path(self.corpus_dir), Path(self.image_dir), Path(self.text_dir))
        return (*dirs, self.image_layer, self.text_layer)

    def load(self, split: str, select: np.ndarray | None = None) -> cache.Pairs:
        from raysys import cache

        return cache.load_pairs(*self._args(), split, select=select)

    def load_index(self, rows: cache.PairIndex, select: np.ndarray | None = None) -> cache.Pairs:
        """Embeddings of an index from `index()` (or of its `select` positions)."""
        from raysys import cache

        dirs = (Path(self.image_dir), Path(self.text_dir))
        return cache.load_index_rows(*dirs, self.image_layer, self.text_layer, rows, select)

    def index(self, split: str) -> cache.PairIndex:
        """The split's usable pairs, ids only (no embeddings read)."""
        from raysys import cache

        return cache.pair_index(*self._args(), split)


def jam_config(tcfg: TrainConfig, d_image: int, d_text: int) -> JAMConfig:
    return JAMConfig(
        d_image=d_image,
        d_text=d_text,
        hidden=tuple(tcfg.hidden),
        latent=tcfg.latent,
        dropout=tcfg.dropout,
        logit_scale=tcfg.logit_scale,
        learn_logit_scale=tcfg.learn_logit_scale,
    )


def check_dims(model: JAM, d_image: int, d_text: int, what: str) -> None:
    """A model only encodes embeddings of the widths it was trained on; say so plainly."""
    if (model.cfg.d_image, model.cfg.d_text) != (d_image, d_text):
        raise CacheError(
            f"{what} expects image/text embeddings of width {model.cfg.d_image}/"
            f"{model.cfg.d_text}, but the cached layers are {d_image}/{d_text} wide; use the "
            "backbones and layers it was trained on"
        )


def alignment_loss(
    tcfg: TrainConfig, zi: torch.Tensor, zt: torch.Tensor, zn: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    if tcfg.objective == "con":
        return losses.con(zi, zt, s)
    if tcfg.objective == "negcon":
        return losses.negcon(zi, zt, zn, s)
    return losses.spread(zi, zt, zn, s, alpha=tcfg.alpha, k=tcfg.k)


class Trainer:
    """One process's share of JAM training: optimiser, schedules and the step itself."""

    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, total_steps: int) -> None:
        self.model = model  # JAM, or JAM wrapped in DistributedDataParallel
        self.jam: JAM = getattr(model, "module", model)
        self.tcfg = tcfg
        self.total_steps = total_steps
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters; 3x faster than the default per-tensor loop
        # for JAM's 10M parameters on one CPU thread (12 vs 35 ms a step), on GPU too.
        self.optimizer = torch.optim.AdamW(
            params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero over the remaining steps. Warm-up is
        capped at a tenth of the run so a short run is not all warm-up."""
        warmup = min(self.tcfg.warmup_steps, max(1, self.total_steps // 10))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def train_step(
        self, image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor
    ) -> dict[str, float]:
        """One optimisation step on this rank's slice of the global batch."""
        self.model.train()
        b = len(text)
        with self._autocast(image.device):
            out = self.model(
                image, torch.cat([text, negative]), cross=self.tcfg.cross_reconstruction
            )
            zi = gather_with_grad(out["zi"])
            zt = gather_with_grad(out["zt"][:b])
            zn = gather_with_grad(out["zt"][b:])
            scale = self.jam.logit_scale()
            align = alignment_loss(self.tcfg, zi, zt, zn, scale)
            rec = losses.reconstruction(out["image_target"], out["image_hat"])
            rec = rec + losses.reconstruction(out["text_target"], out["text_hat"])
            if self.tcfg.cross_reconstruction:
                rec = rec + losses.reconstruction(out["text_target"][:b], out["text_from_image"])
                rec = rec + losses.reconstruction(out["image_target"], out["image_from_text"][:b])
        lam = losses.lambda_schedule(
            self.step, self.total_steps, self.tcfg.lambda_start, self.tcfg.lambda_end
        )
        loss = align + lam * rec
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.step += 1
        # The alignment loss is already global; average the per-rank terms so the logged
        # loss is the global batch's, whatever the number of workers.
        rec_global = _global_mean(rec.detach())
        return {
            "loss": float(align.detach()) + lam * rec_global,
            "align": float(align.detach()),
            "rec": rec_global,
            "lambda": lam,
            "lr": lr,
            "logit_scale": float(scale.detach()),
        }

    @staticmethod
    def _autocast(device: torch.device):
        """bf16 matmuls on GPU (the losses upcast to fp32 themselves); plain fp32 on CPU."""
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


@dataclass
class BatchPlan:
    """Which pairs make up every global batch, and which worker holds them.

    The split's `n` pairs are cut once into `shards` equal, seeded shards (the remainder,
    fewer than `shards` pairs, is left out). Global batch `step` takes `batch_size / shards`
    pairs from each shard, in shard order, from a per-(epoch, shard) permutation. Worker r of
    N holds shards r·S/N … (r+1)·S/N − 1, and its slice of each global batch is exactly its
    shards' parts, so the gathered batch is the same for any N that divides S, and a run
    resumed at any step sees the batches it would have seen without the interruption.
    """

    n: int
    batch_size: int
    shards: int
    seed: int

    def __post_init__(self) -> None:
        self._epoch_orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def shard_size(self) -> int:
        return self.n // self.shards

    @property
    def per_shard(self) -> int:
        return self.batch_size // self.shards

    @property
    def steps_per_epoch(self) -> int:
        return self.shard_size // self.per_shard

    @functools.cached_property
    def _order(self) -> np.ndarray:
        """The one seeded permutation the shards are cut from."""
        return np.random.default_rng([self.seed, self.n]).permutation(self.n)

    def shard_rows(self, shard: int) -> np.ndarray:
        """Positions (in the split's pair index) of the pairs in `shard`, ascending."""
        size = self.shard_size
        return np.sort(self._order[shard * size : (shard + 1) * size])

    def worker_shards(self, rank: int, world: int) -> range:
        per_worker = self.shards // world
        return range(rank * per_worker, (rank + 1) * per_worker)

    def worker_rows(self, rank: int, world: int) -> np.ndarray:
        """What worker `rank` loads: its shards' pairs, shard after shard."""
        return np.concatenate([self.shard_rows(s) for s in self.worker_shards(rank, world)])

    def _in_shard(self, step: int, shard: int) -> np.ndarray:
        """Positions within `shard` of its part of global batch `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        key = (epoch, shard)
        if key not in self._epoch_orders:
            if len(self._epoch_orders) > 2 * self.shards:  # keep about one epoch's orders
                self._epoch_orders.clear()
            rng = np.random.default_rng([self.seed, epoch, shard])
            self._epoch_orders[key] = rng.permutation(self.shard_size)
        return self._epoch_orders[key][index * self.per_shard : (index + 1) * self.per_shard]

    def worker_batch(self, step: int, rank: int, world: int) -> np.ndarray:
        """Worker `rank`'s slice of global batch `step`, as positions in its `worker_rows`."""
        shards = self.worker_shards(rank, world)
        return np.concatenate(
            [i * self.shard_size + self._in_shard(step, s) for i, s in enumerate(shards)]
        )

    def global_batch(self, step: int) -> np.ndarray:
        """Global batch `step` as positions in the split's pair index (one process)."""
        return self.worker_rows(0, 1)[self.worker_batch(step, 0, 1)]


def batch_plan(tcfg: TrainConfig, n: int) -> BatchPlan:
    return BatchPlan(n, tcfg.batch_size, tcfg.data_shards or tcfg.num_workers, tcfg.seed)


def input_moments(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[count, Σx, Σx² of each modality] in float64: additive over batches and ranks."""
    parts = [torch.tensor([float(len(image))], dtype=torch.float64)]
    for x in (image, text):
        x = x.double()
        parts += [x.sum(0), (x * x).sum(0)]
    return torch.cat(parts)


def set_global_input_stats(model: JAM, moments: torch.Tensor) -> None:
    """Input standardisation from the moments of every worker's shard together, so all
    ranks (and a one-worker run on the same shards) standardise identically."""
    import torch.distributed as dist

    flat = moments.clone()
    if dist.is_available() and dist.is_initialized():
        flat = flat.to(model.image_mean.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
    n, stats, offset = flat[0], [], 1
    for d in (model.image_mean.shape[-1], model.text_mean.shape[-1]):
        total, squares = flat[offset : offset + d], flat[offset + d : offset + 2 * d]
        offset += 2 * d
        mean = total / n
        var = (squares - n * mean * mean) / (n - 1)  # unbiased, as torch.std
        stats += [mean, var.clamp(min=0).sqrt()]
    model.set_input_stats(*stats)


def fit_global_input_stats(model: JAM, image: torch.Tensor, text: torch.Tensor) -> None:
    set_global_input_stats(model, input_moments(image, text))


def keep_on_device(
    setting: str, rows: int, width: int, device: torch.device, share: float = 1.0
) -> tuple[bool, str]:
    """Whether a worker's shard lives on its GPU (fast indexing) or in host memory (copied
    per batch); the reason is printed so a user knows which one they got. `share` is this
    worker's fraction of the GPU: packed sweep trials split its free memory."""
    need = rows * width * 2  # float16
    if device.type != "cuda":
        return True, "in host memory, the CPU device's own"
    if setting != "auto":
        on = setting == "true"
        return on, f"{'on the GPU' if on else 'in pinned host memory'} (data_on_device={setting})"
    free, _ = torch.cuda.mem_get_info(device)
    free = int(free * share)
    fits = need < free // 2
    where = "on the GPU" if fits else "in pinned host memory"
    return fits, f"{where} ({need / 2**30:.2f} GiB vs {free / 2**30:.1f} GiB free)"


def _global_mean(value: torch.Tensor) -> float:
    """Mean over ranks of a per-rank scalar (for logging only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    tensor = value.detach().float().reshape(1)  # stays on its device: NCCL needs GPU tensors
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def _all_agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (early stopping must stop all DDP ranks together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


class MemoryBatches:
    """Batches from a worker's in-memory shard, by `BatchPlan`: any step, in any order."""

    def __init__(
        self,
        data: cache.Pairs,
        plan: BatchPlan,
        setting: str,
        rank: int,
        world: int,
        device: torch.device,
        share: float = 1.0,
    ) -> None:
        # Embeddings stay float16 in memory (half the footprint); the model casts per batch.
        width = data.image.shape[1] + 2 * data.text.shape[1]
        on_device, self.where = keep_on_device(setting, len(data), width, device, share)
        self.home = device if on_device else torch.device("cpu")
        arrays = (data.image, data.text, data.negative)
        self.tensors = [torch.as_tensor(a).to(self.home) for a in arrays]
        if self.home != device and device.type == "cuda":
            self.tensors = [t.pin_memory() for t in self.tensors]  # asynchronous copies
        self.plan, self.rank, self.world, self.device = plan, rank, world, device

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        mine = self.plan.worker_batch(step, self.rank, self.world)
        mine_t = torch.as_tensor(mine, device=self.home)
        return tuple(t[mine_t].to(self.device, non_blocking=True) for t in self.tensors)


class StreamBatches:
    """Batches from this worker's Ray Data shard of the pair view, in stream order.

    Steps must be asked for in order. A resumed run skips the batches of the current epoch
    that were already trained on (their count, not the same pairs: Ray Data's order is not
    fixed). Every epoch is read to its end, so the next one starts cleanly on all workers.
    """

    def __init__(
        self, shard: Any, per_worker: int, steps_per_epoch: int, device: torch.device
    ) -> None:
        self.shard, self.per_worker, self.device = shard, per_worker, device
        self.steps_per_epoch = steps_per_epoch
        self._iter: Any = None

    def _epochs(self, start: int) -> Any:
        from raysys.stream import COLUMNS, arrays

        skip = start % self.steps_per_epoch
        while True:
            taken = 0
            for i, batch in enumerate(
                self.shard.iter_batches(
                    batch_size=self.per_worker,
                    batch_format="pyarrow",
                    drop_last=True,
                    local_shuffle_buffer_size=4 * self.per_worker,
                )
            ):
                if i < skip or taken + skip >= self.steps_per_epoch:
                    continue
                x = arrays(batch)
                taken += 1
                yield tuple(torch.as_tensor(x[c]).to(self.device) for c in COLUMNS)
            skip = 0

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        if self._iter is None:
            self._iter = self._epochs(step)
        return next(self._iter)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: step-based, resumable at any reported checkpoint."""
    import ray.train
    import ray.train.torch

    # Ray Train logs every report at INFO on the root logger and also routes print() there;
    # at WARNING, only our one-line validation summaries (and real warnings) reach the driver.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    tcfg = cfg.train
    paths = Paths(**config["paths"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config.get("threads", 1)))
    torch.manual_seed(tcfg.seed)
    device = ray.train.torch.get_device()

    val = paths.load("val") if rank == 0 else None
    stream_rows = config.get("stream_rows")
    if stream_rows is None:
        # Only this worker's shards are read (two layer columns, row batches at a time).
        index = paths.index("train")
        plan = batch_plan(tcfg, len(index))
        data = paths.load_index(index, select=plan.worker_rows(rank, world))
        steps_per_epoch = plan.steps_per_epoch
        dims = (data.image.shape[1], data.text.shape[1])
    else:
        # Ray Train hands each worker an equal share of the pair view, one epoch per pass.
        shard = ray.train.get_dataset_shard("train")
        per_worker = tcfg.batch_size // world
        steps_per_epoch = stream_rows // world // per_worker
        dims = tuple(config["dims"])
    total_steps = steps_per_epoch * tcfg.epochs

    model = JAM(jam_config(tcfg, *dims))
    if stream_rows is None:
        fit_global_input_stats(model, torch.as_tensor(data.image), torch.as_tensor(data.text))
    else:  # one extra pass over the stream, for the standardisation's moments
        from raysys.stream import arrays

        moments = []
        for batch in shard.iter_batches(batch_size=8192, batch_format="pyarrow"):
            x = arrays(batch)
            moments.append(input_moments(torch.as_tensor(x["image"]), torch.as_tensor(x["text"])))
        set_global_input_stats(model, torch.stack(moments).sum(0))
    trainer = Trainer(ray.train.torch.prepare_model(model), tcfg, total_steps)
    best, stale, history = None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(config["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            saved = JAM.load(Path(ckpt) / MODEL_DIR)
            check_dims(saved, *dims, "the checkpoint")
            trainer.jam.load_state_dict(saved.state_dict())
            state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
            trainer.load_state_dict(state["trainer"])
            best, stale = state.get("best"), state.get("stale", 0)
            history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
        if rank == 0:
            print(f"[train] {tcfg.objective}: resumed at step {trainer.step}", flush=True)
    # Same initial weights on every rank (DDP also broadcasts them), independent dropout.
    torch.manual_seed(tcfg.seed + 1000 * rank + trainer.step)

    if stream_rows is None:
        share = config.get("gpu_share", 1.0)
        batches = MemoryBatches(data, plan, tcfg.data_on_device, rank, world, device, share)
        where = (
            f"{plan.shards} data shard(s) of {plan.shard_size} pairs; each worker holds "
            f"{len(data)} pairs {batches.where}"
        )
    else:
        batches = StreamBatches(shard, per_worker, steps_per_epoch, device)
        where = (
            f"streaming {stream_rows} pairs through Ray Data ({config['stream_reason']}), "
            f"{per_worker} per worker per step"
        )
    if rank == 0:
        print(f"[train] {tcfg.objective}: {world} worker(s), {where}", flush=True)
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed attempt logged past the checkpoint we resume from.
        writer = SummaryWriter(config["tensorboard_dir"], purge_step=trainer.step + 1)

    sums: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    while trainer.step < total_steps:
        stats = trainer.train_step(*batches.get(trainer.step))
        window_steps += 1
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
            if writer:
                writer.add_scalar(f"train/{key}", value, trainer.step)
        if trainer.step % tcfg.eval_every and trainer.step < total_steps:
            continue
        elapsed = time.perf_counter() - window_start
        report = {f"train/{k}": v / window_steps for k, v in sums.items()}
        report["train/samples_per_s"] = window_steps * tcfg.batch_size / elapsed
        report |= {"step": trainer.step, "epoch": trainer.step / steps_per_epoch}
        stop = False
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                assert val is not None
                scores = score_model(trainer.jam, val, cfg.eval)
                report |= {f"val/{k}": v for k, v in scores.items()}
                score = report[tcfg.best_metric]
                improved = best is None or (
                    score > best if tcfg.best_mode == "max" else score < best
                )
                best, stale = (score, 0) if improved else (best, stale + 1)
                stop = 0 < tcfg.early_stop_patience <= stale
                print(
                    f"[train] {tcfg.objective} step {trainer.step}/{total_steps} "
                    f"loss {report['train/loss']:.3f} val i2t_r1 {scores['i2t_r1']:.3f} "
                    f"t2i_r1 {scores['t2i_r1']:.3f} mutual_knn {scores['mutual_knn']:.3f} "
                    f"{report['train/samples_per_s']:.0f} samples/s"
                    + (" (early stop)" if stop else ""),
                    flush=True,
                )
                trainer.jam.save(Path(tmp) / MODEL_DIR)
                torch.save(
                    {"trainer": trainer.state_dict(), "best": best, "stale": stale},
                    Path(tmp) / STATE_FILE,
                )
                history.append(report)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if writer:
                    for key, value in report.items():
                        if key.startswith("val/") or key == "train/samples_per_s":
                            writer.add_scalar(key, value, trainer.step)
                    writer.flush()
            ray.train.report(report, checkpoint=ckpt)
        if _all_agree(stop, device):
            break
        sums, window_start, window_steps = {}, time.perf_counter(), 0
    if writer:
        writer.close()
        if config.get("tensorboard_uri"):  # this worker's node may share no disk with the driver
            from raysys import storage

            storage.upload_dir(config["tensorboard_dir"], config["tensorboard_uri"])


@dataclass
class TrainResult:
    objective: str
    model_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def scaling(tcfg: TrainConfig) -> tuple[Any, int]:
    """Ray Train scaling, leaving CPU headroom: workers that reserve every core starve the
    Ray tasks that feed them (ENV-NOTES: that deadlocks silently on 2 cores)."""
    from ray.train import ScalingConfig

    from raysys.runtime import cluster_resources

    res = cluster_resources()
    if tcfg.use_gpu and res.gpus < tcfg.num_workers:
        from raysys.errors import ConfigError

        raise ConfigError(
            f"train.use_gpu with train.num_workers={tcfg.num_workers} needs that many GPUs; "
            f"the cluster has {res.gpus:g}"
        )
    cpus = tcfg.cpus_per_worker or max(0.1, min(1.0, (res.cpus - 1) / tcfg.num_workers))
    threads = max(1, int(res.cpus // tcfg.num_workers)) if not tcfg.use_gpu else 2
    return (
        ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        threads,
    )


def _user_error(err: BaseException | None) -> RaysysError | None:
    """The raysys error inside a Ray worker failure, however Ray wrapped it."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, RaysysError):
            return err
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else err.__cause__
        seen += 1
    return None


def latest_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint with the most steps under a Ray Train run directory, if any.

    Ray Train restores its own checkpoint list only when the stopped run managed to write
    its snapshot file; finding the newest checkpoint ourselves makes resume work either way.
    """
    best: tuple[int, str] | None = None
    for ckpt in Path(run_dir).glob("checkpoint_*"):
        history = ckpt / HISTORY_FILE
        if (ckpt / STATE_FILE).is_file() and history.is_file():
            step = json.loads(history.read_text())[-1]["step"]
            if best is None or step > best[0]:
                best = (step, str(ckpt))
    return best[1] if best else None


def stream_plan(tcfg: TrainConfig, paths: Paths) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Ray Data datasets and worker settings when the train split streams; else nothing."""
    from raysys import stream

    rows = len(paths.index("train"))
    dims = [
        stream.column_width(Path(paths.image_dir), paths.image_layer),
        stream.column_width(Path(paths.text_dir), paths.text_layer),
    ]
    width = dims[0] + 2 * dims[1]
    reason = stream.stream_reason(tcfg.data_on_device, rows, width, tcfg.num_workers)
    if reason is None:
        return None, {}
    view = stream.write_pair_view(paths, "train", rows)
    settings = {"stream_rows": rows, "stream_reason": reason, "dims": dims}
    return {"train": stream.open_view(view)}, settings


def train(
    cfg: Config,
    paths: Paths,
    out_dir: Path,
    name: str,
    resume: bool = False,
    storage_uri: str | None = None,
    callbacks: list[Any] | None = None,
    scaling_plan: tuple[Any, int] | None = None,
    tensorboard_uri: str | None = None,
) -> TrainResult:
    """Fit one JAM model with Ray Train; returns the exported best model and its history.

    With `resume`, training continues from the newest checkpoint under `<out_dir>/ray/<name>`
    (a run stopped by Ctrl-C or a lost driver); a finished run returns at once. With
    `storage_uri` (e.g. s3://bucket/run/ray) Ray Train keeps its checkpoints there instead.
    A sweep trial passes Tune's report callback and its packed `(ScalingConfig, threads)`, and
    with `tensorboard_uri` rank 0 uploads its event files there at the end.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raysys.runtime import init_ray

    init_ray(cfg.ray)
    tcfg = cfg.train
    scaling_config, threads = scaling_plan or scaling(tcfg)
    out_dir = out_dir.resolve()
    storage_fs, storage_path = None, str(out_dir / "ray")
    if storage_uri:
        from raysys import storage

        storage_fs, storage_path = storage.pyarrow_fs(storage_uri)
    started = time.perf_counter()
    datasets, streaming = stream_plan(tcfg, paths)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "paths": dataclasses.asdict(paths),
            "threads": threads,
            "tensorboard_dir": str(out_dir / "tensorboard" / name),
            "tensorboard_uri": tensorboard_uri,
            # A packed trial's worker owns only its fraction of the GPU's memory.
            "gpu_share": (scaling_config.resources_per_worker or {}).get("GPU", 1.0) or 1.0,
            "resume_from": latest_checkpoint(out_dir / "ray" / name) if resume else None,
            **streaming,
        },
        datasets=datasets,
        scaling_config=scaling_config,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints,
                checkpoint_score_attribute=tcfg.best_metric,
                checkpoint_score_order=tcfg.best_mode,
            ),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            # Ray Train logs every report at INFO; the validation summaries are what users read.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        # A bad cache found by a worker (e.g. NaN rows in its shard) is the user's error:
        # show its message, not Ray's wrapped traceback.
        for failure in getattr(err, "worker_failures", {}).values():
            cause = _user_error(failure)
            if cause is not None:
                raise cause from None
        raise
    seconds = time.perf_counter() - started
    model_dir = out_dir / "models" / name
    best = result.get_best_checkpoint(tcfg.best_metric, tcfg.best_mode) or result.checkpoint
    with best.as_directory() as ckpt:
        JAM.load(Path(ckpt) / MODEL_DIR).save(model_dir)
    with result.checkpoint.as_directory() as ckpt:
        history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
    return TrainResult(tcfg.objective, model_dir, result.metrics, history, seconds)
