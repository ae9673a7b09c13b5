"""The project's stops, each with its own exit code (``EXIT_CODES``; the README lists them).

Anything the user can fix (a missing path, an unreadable file, a wrong flag, an artifact of another
run) is a :class:`BadInputError`: one line, exit code 2. A run that stops for another reason the user
should read (:class:`RunStoppedError`: a diverged loss, a dead process) is one line with its own code.
Every other exception is a bug and keeps its traceback (exit code 1). The subclasses also derive from
the matching built-in, so ``except FileNotFoundError`` and ``except ValueError`` still catch them.
"""

import os
import sys

EXIT_CODES = {
    0: "success",
    1: "unexpected error: a bug, reported with its traceback",
    2: "bad input: a path, file, flag or artifact to fix, named in one line",
    3: "training diverged: a non-finite loss or parameters; the last good resumable state is named",
    4: "predict.py: some input pictures were unreadable and skipped (the others are written)",
    5: "a process of a multi-process job died; the others were stopped",
    130: "interrupted by Ctrl-C (SIGINT)",
    143: "terminated by SIGTERM (e.g. a cluster pre-emption); the resumable state was saved",
}
EXIT_SKIPPED_INPUTS, EXIT_INTERRUPTED, EXIT_TERMINATED = 4, 130, 143


class BadInputError(Exception):
    """Input the user can fix; reported as one line, exit code 2."""

    exit_code = 2


class InputNotFoundError(BadInputError, FileNotFoundError):
    """A file or folder the run needs is missing; the message says what to run or provide."""


class InvalidInputError(BadInputError, ValueError):
    """A flag, file or artifact that exists but cannot be used as it is."""


class RunStoppedError(Exception):
    """A run stopped for a reason that is neither bad input nor a bug; one line, its own exit code."""

    exit_code = 1


class NonFiniteLossError(RunStoppedError):
    """The loss became NaN or infinite; the message names the step, the loss terms and the last good state."""

    exit_code = 3


class WorkerFailedError(RunStoppedError):
    """A process of a multi-process run died (killed, crashed); the others were stopped."""

    exit_code = 5


class SpawnedExit(Exception):
    """A spawned process stopped and has already printed its own line; its exit code is passed on."""

    def __init__(self, exit_code):
        super().__init__(exit_code)
        self.exit_code = exit_code


REPORTED_ERRORS = (BadInputError, RunStoppedError)


def one_line(err):
    """The message of ``err`` on one line. DataLoader workers re-raise an error in the main process with
    the worker's traceback appended to its message: only the original message (the last line) is kept."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1:
        for head in (f"{type(err).__module__}.{type(err).__name__}: ", f"{type(err).__name__}: "):
            if lines[-1].startswith(head):
                return lines[-1][len(head) :]
    return lines[-1] if lines else type(err).__name__


def show_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` of the command line: one ``warning:`` line on stderr, from the first process."""
    if os.environ.get("RANK", os.environ.get("CAUSE_SPAWN_RANK", "0")) == "0":
        print(f"warning: {message}", file=sys.stderr)
