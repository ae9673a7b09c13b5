"""Atomic file writes: a temporary file next to the target, renamed over it once complete.

A reader of the target sees the previous or the new complete file, never a part of one: an error,
Ctrl-C or SIGKILL during the write leaves the target as it was. A write that fails (disk full,
read-only file system, no permission) is one line naming the path, and its temporary file is removed.
Temporary files end in ``.tmp<pid>``; :func:`remove_stale_temporaries` removes those of killed processes.
"""

import glob
import hashlib
import io
import os

import numpy as np
import torch
from PIL import Image

from utils.errors import BadInputError

TMP_SUFFIX = ".tmp"


class OutputWriteError(BadInputError, OSError):
    """An output file could not be written; the previous file at its path is unchanged."""


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` through a temporary file and a rename; returns its sha256."""
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err}; nothing was written there") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return hashlib.sha256(data).hexdigest()


def atomic_write(path, write):
    """``write(file)`` into memory, then those bytes written atomically to ``path``; returns their sha256."""
    buffer = io.BytesIO()
    write(buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_torch_save(obj, path):
    """``torch.save`` in memory, then written atomically; returns the file's sha256."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_np_save(array, path):
    """``np.save`` in memory, then written atomically; returns the file's sha256."""
    return atomic_write(path, lambda f: np.save(f, array))


def atomic_save_image(array, path, image_format="PNG", **options):
    """Encode ``array`` ([H, W] or [H, W, 3] uint8) with Pillow in memory, then write it atomically."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format=image_format, **options))


def pid_alive(pid):
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def remove_stale_temporaries(directory):
    """Remove (and return) the temporary files that dead processes of this host left in ``directory``.

    A temporary file of a live process (a concurrent writer) is kept.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"*{TMP_SUFFIX}*")):
        pid = path.rsplit(TMP_SUFFIX, 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed
