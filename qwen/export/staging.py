"""Write an export beside its destination, then rename it into place: no half-written DST, ever.

An export takes minutes to hours and can fail at any point (a full disk, Ctrl-C, a damaged shard).
Writing straight into DST would leave a folder that looks complete to the next loader. Instead the
output is written to a hidden temporary path in DST's parent (same file system, so the final rename
is atomic and needs no copy), removed on any failure, and renamed to DST only once complete.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .source import ExportError

GB = 1024**3


def check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    """Refuse a DST that holds something (unless ``overwrite``) or that is, or contains, the source."""
    dst_abs, src_abs = dst.expanduser().resolve(), src.resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents or dst_abs in src_abs.parents:
        raise ExportError(f"DST {dst} overlaps the source folder {src}; choose a DST outside it")
    occupied = any(dst.iterdir()) if dst.is_dir() else dst.exists()
    if occupied and not overwrite:
        raise ExportError(f"{dst} already exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                          f"or choose another DST")


@contextmanager
def staged(dst: Path, needed_bytes: int) -> Iterator[Path]:
    """A temporary path beside ``dst`` to write the export to (a folder, or a file if ``dst`` ends in .gguf);
    renamed to ``dst`` (replacing what was there) when the block succeeds, removed when it fails.

    ``needed_bytes`` is checked against the free space first, and a full disk during the writing becomes
    the same one-line :class:`ExportError`.
    """
    parent = dst.expanduser().absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {parent} ({exc.strerror}); choose a DST in a writable folder") from None
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise ExportError(_no_space(parent, needed_bytes, free))
    temp = parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    if dst.suffix != ".gguf":
        temp.mkdir()
    try:
        yield temp
        _replace(temp, dst.expanduser().absolute())
    except BaseException as exc:
        _remove(temp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(_no_space(parent, needed_bytes, shutil.disk_usage(parent).free)) from None
        raise


def _no_space(parent: Path, needed: int, free: int) -> str:
    return (f"not enough disk space in {parent}: the export needs about {needed / GB:.2f} GB and "
            f"{free / GB:.2f} GB are free; free some space or choose a DST on another disk")


def _replace(temp: Path, dst: Path) -> None:
    """Move ``temp`` to ``dst``; an old ``dst`` is moved aside first and deleted only after the rename."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(temp, dst)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
