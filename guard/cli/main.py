"""The ``guard`` command: parser, dispatch to the subcommand modules of ``guard.cli``, exit codes.

Exit codes (docs/design.md): 0 clean / done, 1 backdoor suspected, 2 usage or input error, 3 model and
profile do not match. User errors print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from guard.errors import GuardError

COMMANDS = ["scan", "audit", "purify", "check", "archive", "serve", "stop", "demo", "bench", "inspect"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one readable line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guard", description="Inference-time backdoor defense for PyTorch models "
                     "served with TorchServe. Exit codes: 0 clean/done, 1 backdoor suspected, "
                     "2 usage or input error, 3 model and profile do not match.")
    parser.add_argument("--version", action="version", version=f"guard {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if importlib.util.find_spec(f"guard.cli.{name}") is None:
            continue  # a subcommand module being written in this working tree
        module = importlib.import_module(f"guard.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           aliases=list(getattr(module, "ALIASES", ())))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from guard import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from guard._malloc import retain_freed_memory

    retain_freed_memory()  # scans and benchmarks reallocate the same large buffers at every step
    try:
        return int(args._run(args) or 0)
    except GuardError as e:
        print(f"guard {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"guard {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
