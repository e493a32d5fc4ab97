"""Command-line entry point ``nuclass-qupath``.

Each command lives in its own module with a ``register(subparsers)`` function
that adds its parser and sets ``func``. Command modules import heavy libraries
(torch, openslide, paquo) inside the function that runs the command, so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nuclass_qupath import __version__
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
        except ModuleNotFoundError as exc:
            if exc.name == f"nuclass_qupath.cli.{name}":
                continue
            raise
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
        result = args.func(args)
    except NuclassError as exc:
        # Bad input: one clear line, no traceback. --log-level DEBUG shows the cause.
        logger.debug("command failed", exc_info=True)
        print(f"nuclass-qupath {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nuclass-qupath: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
