"""Reading a small file that a user names (recipes, level databases): regular files only."""

from __future__ import annotations

import os
import stat


def read_regular_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``.

    A FIFO, device, socket or directory raises ``ValueError`` before it is opened (opening a FIFO would block, a device might never end); the check is repeated on
    the descriptor, which is opened non-blocking, so a path swapped in between cannot block
    either. ``OSError`` when the file cannot be read. Callers turn ValueError into their own
    error class.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return handle.read()
