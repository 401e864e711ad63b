"""``python -m modeling_dflare.cli`` (e.g. under ``accelerate launch``): the ``dflare`` command.

The implementation lives in the top-level :mod:`dflare_cli` module so that ``dflare --help`` does
not import torch and transformers through this package.
"""

import sys

from dflare_cli import SUBCOMMANDS, build_parser, main

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
