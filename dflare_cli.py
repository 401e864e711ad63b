"""The ``dflare`` command: one subcommand per task, each implemented in its own module.

This module sits outside the ``modeling_dflare`` package on purpose: importing the package loads
torch and transformers (seconds), and ``dflare --help`` should not wait for them. Every module
listed in :data:`SUBCOMMANDS` provides ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when its subcommand runs.

Errors a user can fix (a missing file, a bad value) print one line naming the problem; ``--debug``
shows the full traceback instead.
"""

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = {
    "demo": ("modeling_dflare.demo", "SmolLM2 + the shipped draft: text, acceptance length, speedup"),
    "regenerate": ("modeling_dflare.regenerate", "rewrite dataset responses with the target itself"),
    "train": ("modeling_dflare.training", "train a DFlare/DFlash draft for a target"),
    "tune-cut": ("modeling_dflare.training.tune", "re-choose a draft's confidence cut for this machine"),
    "cache": ("modeling_dflare.training.cache", "compact a hidden-state cache to fp8 and drop files no data uses"),
    "evaluate": ("modeling_dflare.training.evaluate", "a draft's held-out accuracy and acceptance length per answer folder"),
    "bench": ("modeling_dflare.bench", "acceptance length and wall-clock speedup vs alternatives"),
    "push": ("modeling_dflare.hub", "validate and upload a draft folder to the Hub"),
    "push-space": ("modeling_dflare.hub", "validate and upload the Space folder to the Hub"),
    "convert": ("modeling_dflare.convert", "convert z-lab DFlash / AngelSlim DFlare checkpoints"),
}

#: Exceptions that mean "the input is wrong", reported in one line (anything else is a bug: full traceback).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflare", description="DFlare block-diffusion speculative decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
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
    module_name, help_text = SUBCOMMANDS[known.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dflare {known.command}", description=help_text)
    add_arguments = getattr(module, f"add_{known.command.replace('-', '_')}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{known.command.replace('-', '_')}", None) or module.run
    add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        return int(run(args) or 0)
    except USER_ERRORS as error:
        if known.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"dflare {known.command}: error: {message}  (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
