"""How the command-line entry points report a bad input, or Ctrl-C: one line on stderr and a non-zero exit code.

Library functions raise ordinary exceptions with messages that name the problem (the key, the path, the value).
An entry point wraps its work in :func:`one_line_errors`, which turns those into ``SystemExit("error: ...")`` —
Python prints that message alone, without a traceback, and exits with status 1. Anything else (a bug) keeps its
traceback. Ctrl-C is no error: :func:`one_line_interrupt` prints "interrupted", with what was kept where the command
knows it, and exits with status 130, as a shell reports a command stopped by SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)


class MissingExtraError(ImportError):
    """An optional dependency that the work needs is not installed; the message names the pip command that adds it.
    An ImportError, so callers that catch those still do; the commands report it as a user error."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story: bad configs and arguments, missing or foreign files, a
    missing optional dependency, refused launches and resumes, a stopped run, a failed push."""
    from .distributed import LaunchError
    from .hub.push import PushError
    from .training.step import NonFiniteLossError

    return (ValueError, OSError, MissingExtraError, LaunchError, NonFiniteLossError, PushError)


@contextlib.contextmanager
def one_line_errors():
    """Turn a user error raised inside the block into ``SystemExit`` with its first line (see the module doc)."""
    try:
        yield
    except user_error_types() as error:
        logger.debug("stopping on a user error", exc_info=True)
        message = str(error).strip() or type(error).__name__
        raise SystemExit(f"error: {' '.join(message.splitlines())}") from None


INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT


@contextlib.contextmanager
def one_line_interrupt(what_was_kept: Callable[[], str | None] | None = None):
    """Turn Ctrl-C (KeyboardInterrupt) inside the block into one line on stderr and exit status 130.

    The line is "interrupted", followed by what ``what_was_kept()`` returns (called only then: e.g. the last complete
    checkpoint, which the interrupted work may have just written) when it returns something.
    """
    try:
        yield
    except KeyboardInterrupt:
        kept = what_was_kept() if what_was_kept is not None else None
        print("interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_STATUS) from None
