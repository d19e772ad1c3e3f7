"""Atomic file writes, the one implementation for checkpoints (:mod:`utils.checkpoint`) and :mod:`models.export`.

A file is written under a temporary name in its directory, flushed and renamed onto its path, so the path is always
the old file or the complete new one. In ``models`` so that the model package needs nothing from the training code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path next to ``path``, fsync'ed and renamed onto it when the block ends without an error, else
    removed; blocks can nest (each file is committed at its own block's end)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions open() would give, not mkstemp's 0600
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories; the rename is still atomic
        _fsync(directory)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)
