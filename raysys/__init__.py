"""raysys: JAM alignment of frozen vision and language models, distributed on Ray."""

from raysys.runtime import loopback_env

loopback_env()  # before any `import ray`: Ray reads its bind settings at import time

__version__ = "0.1.0"
