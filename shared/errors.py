"""The errors a user can cause, as opposed to our own bugs.

A wrong path, a bad value, a corrupt or mismatched file: each is raised as a `ValueError`
or an `OSError` (or one of the subclasses below) whose message names the file, record or
setting. The command line turns them into one line and a non-zero exit; the ClientApp into
a fixed, data-free error reply (`client/failures.py`); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from safetensors import SafetensorError


class ModelLoadError(ValueError):
    """A base model directory that cannot be loaded (no weights, an invalid config, a corrupt file)."""


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded on this base (corrupt, or made for another base)."""


# What a user's input can make the project raise; SafetensorError is the safetensors
# library's own error for a corrupt file, which is not a ValueError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, SafetensorError)


def one_line(error: BaseException) -> str:
    """The first line of an error's message (library errors can run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
