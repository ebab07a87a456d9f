"""raysys: JAM alignment of frozen vision and language models, distributed on Ray."""

from raysys.runtime import driver_env, loopback_env

loopback_env()  # before any `import ray`: Ray reads its bind settings at import time
driver_env()  # likewise its log deduplication; and Ray Data's Parquet footer readers

__version__ = "0.1.0"
