"""Atomic file output: write to a temporary file beside the target, then rename.

A run that fails or is interrupted leaves the target as it was and no partial
file behind, because ``os.replace`` within one folder is atomic on POSIX and
Windows.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file as 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, compress: bool | None = None) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file, gzip-compressed when it ends in ``.gz``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. ``compress`` overrides the
    choice made from the suffix.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    if compress is None:
        compress = str(path).endswith(".gz")
    with atomic_path(path) as tmp:
        raw: IO[bytes]
        if compress:
            # mtime=0 keeps output byte-identical across runs.
            raw = gzip.GzipFile(tmp, "wb", compresslevel=6, mtime=0)
        else:
            raw = open(tmp, "wb")
        with raw:
            if mode == "w":
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
                try:
                    yield text
                finally:
                    text.flush()
                    text.detach()
            else:
                yield raw
