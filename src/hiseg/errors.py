"""One base for every error hiseg raises on purpose, so callers (the CLI, the service, the batch
engines) can tell a user's mistake or a bad input from a bug with one ``except HisegError``.

``str(err)`` is always one line that names the thing (file, key, model) and the reason.
"""

from __future__ import annotations


class HisegError(Exception):
    """A user mistake or a bad input: reported in one line, never a traceback."""

    #: The CLI's exit status for it (2: a usage or input error, the shell's convention).
    exit_code = 2
