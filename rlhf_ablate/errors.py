"""Errors a user can act on.

Every error that reaches the CLI is a subclass of :class:`RlhfAblateError`. The CLI prints its message as one
paragraph and exits non-zero; no traceback, because the message already names the key, file or row to fix.
"""


class RlhfAblateError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ConfigError(RlhfAblateError):
    """A config or sweep file is invalid: unknown key, wrong type, bad value, infeasible combination."""


class DataError(RlhfAblateError):
    """A data file is missing or a row is malformed. The message names the file and line."""


class ModelError(RlhfAblateError):
    """A model cannot be loaded: missing path, hub id unreachable offline, unsupported architecture."""


class TrialFailed(RlhfAblateError):
    """A trial stopped early for a recorded reason (divergence, NaN loss, KL blow-up)."""
