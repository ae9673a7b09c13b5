"""The project's bad-input exceptions.

Anything the user can fix (a missing path, an unreadable file, a wrong flag, an artifact of
another run) is raised as a subclass of :class:`BadInputError`; the stage scripts print it as
one line and exit with code 2. A run that stops for another reason the user should read
(:class:`RunStoppedError`: a non-finite loss, a dead process) is reported the same way
with its own exit code. Every other exception is a bug and keeps its traceback.
The subclasses also derive from the matching built-in, so ``except FileNotFoundError`` and
``except ValueError`` still catch them.
"""


class BadInputError(Exception):
    """Input the user can fix; reported as one line, exit code 2."""

    exit_code = 2


class InputNotFoundError(BadInputError, FileNotFoundError):
    """A file or folder the run needs is missing; the message says what to run or provide."""


class InvalidInputError(BadInputError, ValueError):
    """A flag, file or artifact that exists but cannot be used as it is."""


class SpawnedBadInput(BadInputError):
    """A spawned process stopped on bad input and has already printed its one-line error."""

    def __init__(self, exit_code=2):
        super().__init__()
        self.exit_code = exit_code


class RunStoppedError(Exception):
    """A run stopped for a reason that is neither bad input nor a bug; one line, its own exit code."""

    exit_code = 1


class NonFiniteLossError(RunStoppedError):
    """The loss became NaN or infinite; the message names the step, the loss terms and the last good state."""

    exit_code = 3


class WorkerFailedError(RunStoppedError):
    """A process of a multi-process run died (killed, crashed); the others were stopped."""

    exit_code = 1


REPORTED_ERRORS = (BadInputError, RunStoppedError)


def one_line(err):
    """The message of ``err`` on one line.

    DataLoader workers re-raise an error in the main process with the worker's traceback
    appended to its message; only the original message (the last line) is kept.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) == 1:
        return lines[0]
    last = lines[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    for head in (prefix, f"{type(err).__name__}: "):
        if last.startswith(head):
            return last[len(head):]
    return last
