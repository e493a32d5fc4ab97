"""Command-line entry point ``nuclass-qupath``.

Each command lives in its own module with a ``register(subparsers)`` function
that adds its parser and sets ``func``. Command modules import heavy libraries
(torch, openslide, paquo) inside the function that runs the command, so
``--help`` stays instant. Every command module listed in
:data:`COMMAND_MODULES` is required: none needs an optional dependency at
import time, so an ImportError there means a broken installation and is raised.

A command module sets ``ATOMIC_OUTPUT = True`` when every file it writes goes
through :mod:`nuclass_qupath._atomic`; Ctrl-C then reports that no partial
output was written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nuclass_qupath import __version__
from nuclass_qupath.cli._progress import close_progress_bars
from nuclass_qupath.errors import NuclassError

logger = logging.getLogger("nuclass_qupath")

# Order of the commands in --help.
COMMAND_MODULES = (
    "classify",
    "project",
    "export_geojson",
    "train",
    "calibrate",
    "evaluate",
    "explain",
    "xenium",
    "build_store",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nuclass-qupath",
        description="Classify H&E nuclei into cell types and return the result to QuPath.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for messages on standard error (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nuclass_qupath.cli.{name}")
        except ImportError as exc:
            raise ImportError(
                f"the nuclass-qupath command module nuclass_qupath.cli.{name} failed to import ({exc}); "
                "the installation is incomplete: reinstall nuclass-qupath with its dependencies",
                name=exc.name,
            ) from exc
        module.register(subparsers)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level)
    try:
        try:
            result = args.func(args)
        finally:
            # An open bar would redraw itself, or raise, when it is collected at exit.
            close_progress_bars()
    except NuclassError as exc:
        # Bad input: one clear line, no traceback. --log-level DEBUG shows the cause.
        logger.debug("command failed", exc_info=True)
        print(f"nuclass-qupath {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A full disk or a folder that rejects writes is not a bug to show a
        # traceback for. Outputs are written to a temporary file and renamed,
        # so nothing half-written is left behind.
        logger.debug("command failed", exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        reason = exc.strerror or str(exc)
        print(
            f"nuclass-qupath {args.command}: error: {reason}{where}; free space or choose another output folder "
            "(--log-level DEBUG shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        logger.debug("interrupted", exc_info=True)
        print(f"nuclass-qupath {args.command}: {interrupt_message(args.func)}", file=sys.stderr)
        return 130
    return int(result or 0)


def interrupt_message(func) -> str:
    """Return the line printed on Ctrl-C for the command run by ``func``."""
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    if getattr(module, "ATOMIC_OUTPUT", False):
        return "interrupted; no partial output was written"
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
