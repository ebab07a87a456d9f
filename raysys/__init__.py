"""raysys: JAM alignment of frozen vision and language models, distributed on Ray."""

from raysys.runtime import log_env, loopback_env

loopback_env()  # before any `import ray`: Ray reads its bind settings at import time
log_env()  # likewise its log deduplication settings

__version__ = "0.1.0"
