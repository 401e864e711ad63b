"""The ``dflare`` command: one subcommand per task, each implemented in its own module.

This module sits outside the ``modeling_dflare`` package on purpose: importing the package loads
torch and transformers (seconds), and ``dflare --help`` should not wait for them. Each entry of
:data:`SUBCOMMANDS` names its module and the module's two functions, ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its subcommand runs. ``python -m dflare_cli``
runs the same command (``accelerate launch -m dflare_cli train ...`` spreads training over processes).

Errors a user can fix (a missing file, a bad value) print one line naming the problem; ``--debug``
shows the full traceback instead.
"""

import argparse
import importlib
import logging
import os
import sys
from typing import NamedTuple


class Subcommand(NamedTuple):
    """Where a subcommand lives: its module, its help line and the names of its two functions there."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


SUBCOMMANDS = {
    "demo": Subcommand("modeling_dflare.demo", "SmolLM2 + the shipped draft: text, acceptance length, speedup"),
    "regenerate": Subcommand("modeling_dflare.regenerate", "rewrite dataset responses with the target itself"),
    "train": Subcommand("modeling_dflare.training", "train a DFlare/DFlash draft for a target"),
    "tune-cut": Subcommand("modeling_dflare.training.tune", "re-choose a draft's confidence cut for this machine"),
    "cache": Subcommand("modeling_dflare.training.cache", "compact a hidden-state cache to fp8 and drop files no data uses"),
    "evaluate": Subcommand("modeling_dflare.training.evaluate", "a draft's held-out accuracy and acceptance length per answer folder"),
    "bench": Subcommand("modeling_dflare.bench", "acceptance length and wall-clock speedup vs alternatives"),
    "push": Subcommand("modeling_dflare.hub", "validate and upload a draft folder to the Hub", "add_push_arguments", "run_push"),
    "push-space": Subcommand(
        "modeling_dflare.hub", "validate and upload the Space folder to the Hub", "add_push_space_arguments", "run_push_space"
    ),
    "convert": Subcommand("modeling_dflare.convert", "convert z-lab DFlash / AngelSlim DFlare checkpoints"),
    "export-target": Subcommand("modeling_dflare.export_target", "save a .gguf target as a folder that loads in seconds"),
    "check-lossless": Subcommand("modeling_dflare.lossless", "thousands of random greedy and sampling cases: output is the target's"),
}

#: Exceptions that mean "the input is wrong", reported in one line (anything else is a bug: full traceback).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflare", description="DFlare block-diffusion speculative decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    known, rest = parser.parse_known_args(argv)
    if "--debug" in rest:  # also accepted after the subcommand
        rest.remove("--debug")
        known.debug = True
    logging.basicConfig(level=logging.DEBUG if known.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = SUBCOMMANDS[known.command]
    module = importlib.import_module(command.module)
    sub = argparse.ArgumentParser(prog=f"dflare {known.command}", description=command.help)
    getattr(module, command.add_arguments)(sub)
    args = sub.parse_args(rest)
    try:
        return int(getattr(module, command.run)(args) or 0)
    except USER_ERRORS as error:
        if known.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"dflare {known.command}: error: {message}  (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
