"""The smallest `raysys run` a job test submits: one model pair, one layer pair, one epoch of
a narrow JAM on 60 synthetic pairs (a minute or so on 2 cores)."""

SMALL_RUN = [
    "corpus.size=60",
    "objectives=con",
    "sweep.models=efficientnet-lite0+minilm-l6",  # `run` is a sweep: keep it to one trial
    "sweep.layers=-1:-1",
    "train.epochs=1",
    "train.batch_size=16",
    "train.eval_every=3",
    "train.hidden=64",
    "train.latent=16",
]
