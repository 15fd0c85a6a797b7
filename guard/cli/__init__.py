"""``guard`` command line: argparse front end, one module per subcommand (``guard.cli.scan``, ...)."""

from guard.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
