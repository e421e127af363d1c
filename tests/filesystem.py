"""File systems that refuse writes, made without mounting anything (tests run as any user, root included).

    with read_only(directory): ...            # every write under directory fails (EACCES, or EPERM as root)
    with file_size_limit(16 * 1024): ...     # a write past 16 KiB of any file fails with EFBIG ("disk full")

Permissions do not stop root, so as root ``read_only`` sets the file system's immutable attribute
(``chattr +i``) on every directory instead: the kernel then refuses to create, rename or delete
entries in them for every user. ``file_size_limit`` is the kernel's per-process file-size limit
(RLIMIT_FSIZE), the same refusal a full quota gives; it holds for the whole process, so keep the block
to the one call that writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
import struct
from pathlib import Path
from typing import Iterator

import pytest

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10  # linux/fs.h


def _flags(path: Path, set_to: int | None = None) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if set_to is None:
            return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", set_to))
        return set_to
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` and every directory below it read-only for this block, for any user."""
    directories = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in directories}
        for p in directories:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    flags: dict[Path, int] = {}
    try:
        for p in directories:
            flags[p] = _flags(p)
            _flags(p, flags[p] | FS_IMMUTABLE_FL)
    except OSError as exc:
        for p, f in flags.items():
            _flags(p, f)
        pytest.skip(f"running as root on a file system without the immutable attribute ({exc}): cannot make {directory} read-only")
    try:
        yield
    finally:
        for p, f in flags.items():
            _flags(p, f)


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """Writes that would grow a file past ``n_bytes`` fail with EFBIG for this block (as on a full quota)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
