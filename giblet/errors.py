"""One exception root for everything giblet raises on purpose.

Each subclass also inherits the matching built-in, so callers can catch either
``GibletError`` or the usual ``ValueError`` / ``FileNotFoundError``.
Messages follow one rule: *what* (file, subject, stage), *the value*, *the rule*,
*the fix* -- on one line, because the CLI prints ``str(error)`` and nothing else.
"""


class GibletError(Exception):
    """Root of all deliberate giblet errors."""


class ConfigError(GibletError, ValueError):
    """The YAML config or a ``key=value`` override is wrong."""


class InputError(GibletError, ValueError):
    """An input file (NIfTI, movie, spreadsheet, model directory) is unusable."""


class InputMissingError(InputError, FileNotFoundError):
    """An input file does not exist."""


class StoreError(GibletError, RuntimeError):
    """A store is missing, incomplete, locked or fails verification."""


class ModalityMissingError(StoreError, KeyError):
    """The store has no data for the requested modality or subject."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
