"""How the command-line entry points report a bad input: one line on stderr and a non-zero exit code.

Library functions raise ordinary exceptions with messages that name the problem (the key, the path, the value).
An entry point wraps its work in :func:`one_line_errors`, which turns those into ``SystemExit("error: ...")`` —
Python prints that message alone, without a traceback, and exits with status 1. Anything else (a bug) keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger(__name__)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story: bad configs and arguments, missing or foreign files,
    refused launches and resumes, a stopped run, a failed push."""
    from .distributed import LaunchError
    from .hub.push import PushError
    from .training.step import NonFiniteLossError

    return (ValueError, OSError, LaunchError, NonFiniteLossError, PushError)


@contextlib.contextmanager
def one_line_errors():
    """Turn a user error raised inside the block into ``SystemExit`` with its first line (see the module doc)."""
    try:
        yield
    except user_error_types() as error:
        logger.debug("stopping on a user error", exc_info=True)
        message = str(error).strip() or type(error).__name__
        raise SystemExit(f"error: {' '.join(message.splitlines())}") from None
