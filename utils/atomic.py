"""Atomic file writes: a temporary file next to the target, renamed over it once complete.

A reader of the target sees the previous complete file or the new complete file, never a
part of one: an error, Ctrl-C or SIGKILL during the write leaves the target as it was. A
write that fails (disk full, read-only file system, no permission) is one line naming the
path, and its temporary file is removed.
"""

import io
import os

from PIL import Image

from utils.errors import BadInputError


class OutputWriteError(BadInputError, OSError):
    """An output file could not be written; the previous file at its path is unchanged."""


def tmp_name(path):
    return f"{path}.tmp{os.getpid()}"


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` through a temporary file and a rename."""
    tmp = tmp_name(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputWriteError(f"cannot write {path}: {reason}; nothing was written there") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_save_image(array, path, image_format="PNG", **options):
    """Encode ``array`` ([H, W] or [H, W, 3] uint8) with Pillow in memory, then write it atomically."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **options)
    atomic_write_bytes(path, buffer.getvalue())
