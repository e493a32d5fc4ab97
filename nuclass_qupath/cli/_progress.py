"""Progress bars for the CLI (tqdm on standard error; silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

# Bars opened by this module and not closed yet; the CLI closes them when a command ends.
_open_bars: list[Any] = []


def _new_bar(**kwargs: Any) -> Any:
    from tqdm import tqdm

    bar = tqdm(disable=not sys.stderr.isatty(), leave=False, **kwargs)
    # tqdm sets ``disable`` when a bar closes, so disabled bars need no closing.
    _open_bars[:] = [open_bar for open_bar in _open_bars if not open_bar.disable]
    _open_bars.append(bar)
    return bar


def progress_callback(total: int, description: str) -> Callable[[int], None]:
    """Return a callback that advances a progress bar by the number it is given."""
    bar = _new_bar(total=total, desc=description, unit="cell")

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def progress_iter(iterable: Iterable, description: str, total: int | None = None) -> Iterable:
    """Wrap an iterable in a progress bar."""
    return _new_bar(iterable=iterable, desc=description, total=total)


def close_progress_bars() -> None:
    """Close every bar this module opened, as when a command ends or is interrupted."""
    while _open_bars:
        _open_bars.pop().close()
