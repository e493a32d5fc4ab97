"""Progress bars for the CLI (tqdm on standard error; silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable


def progress_callback(total: int, description: str) -> Callable[[int], None]:
    """Return a callback that advances a progress bar by the number it is given."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="cell", disable=not sys.stderr.isatty(), leave=False)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def progress_iter(iterable: Iterable, description: str, total: int | None = None) -> Iterable:
    """Wrap an iterable in a progress bar."""
    from tqdm import tqdm

    return tqdm(iterable, desc=description, total=total, disable=not sys.stderr.isatty(), leave=False)
