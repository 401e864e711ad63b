"""The ``dflare`` command: one subcommand per task, each implemented in its own module.

Every module listed in :data:`SUBCOMMANDS` provides ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so ``dflare --help`` stays fast.
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
    "bench": ("modeling_dflare.bench", "acceptance length and wall-clock speedup vs alternatives"),
    "push": ("modeling_dflare.hub", "validate and upload a draft folder to the Hub"),
    "push-space": ("modeling_dflare.hub", "validate and upload the Space folder to the Hub"),
    "convert": ("modeling_dflare.convert", "convert z-lab DFlash / AngelSlim DFlare checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflare", description="DFlare block-diffusion speculative decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if known.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module_name, help_text = SUBCOMMANDS[known.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dflare {known.command}", description=help_text)
    add_arguments = getattr(module, f"add_{known.command.replace('-', '_')}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{known.command.replace('-', '_')}", None) or module.run
    add_arguments(sub)
    return int(run(sub.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
