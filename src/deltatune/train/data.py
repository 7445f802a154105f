"""Moved to :mod:`deltatune.data` (records, tokenize, batching, prepare); these names stay importable
from here for existing callers."""

from deltatune.data import *  # noqa: F403
from deltatune.data import __all__  # noqa: F401
