"""Exceptions a user can cause; each message says what was wrong and what to do."""


class RaysysError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(RaysysError):
    """A bad config key, value or file."""


class CorpusError(RaysysError):
    """A corpus that cannot be read, or too many bad rows."""


class BackboneError(RaysysError):
    """A backbone that cannot be loaded or a layer it does not have."""


class CacheError(RaysysError):
    """An embedding cache that is missing, incomplete or inconsistent."""


class Interrupted(RaysysError):
    """A sweep stopped (Ctrl-C) with trials left; `resume=` runs only those (exit code 130)."""
