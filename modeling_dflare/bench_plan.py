"""Which methods ``dflare bench`` runs on a target, decided before the target loads.

The defaults follow the target, not the shipped SmolLM2 drafts: a method runs only if its draft fits
the target (:func:`draft_fit_problems`: hidden size, vocabulary and layer count, read from the
draft's ``config.json`` and from the target's small files, :func:`~modeling_dflare.target_info.target_info`).
A default draft that does not fit (the shipped SmolLM2 DFlash draft beside another target, say) is
dropped with one logged line naming the mismatch; a draft or a method asked for by name that does
not fit is an error naming it.

Whenever a speculative method is timed, ``plain-fast`` runs too: plain decoding on the small-row
kernels DFlare verifies on, so that a gain of the kernels (a large LM head on a CPU) and a gain of
the drafting are told apart instead of summed into one speedup over ``plain``.
"""

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: The plain baselines (eager, on the small-row kernels, compiled on a static cache); every other method speculates.
PLAIN_METHODS = ("plain", "plain-fast", "plain-static")


def draft_fit_problems(draft_dir: str | Path, info) -> list[str]:
    """How the draft in ``draft_dir`` (its ``config.json``) does not fit the target ``info``
    (a :class:`~modeling_dflare.target_info.TargetInfo`); empty when it fits or a size is unknown."""
    config = json.loads((Path(draft_dir) / "config.json").read_text())
    problems = []
    for what, draft_key, value in (("hidden size", "hidden_size", info.hidden_size), ("vocab", "vocab_size", info.vocab_size),
                                   ("layer count", "num_target_hidden_layers", info.num_hidden_layers)):
        if value is not None and config.get(draft_key) is not None and config[draft_key] != value:
            problems.append(f"{what} {config[draft_key]} vs {value}")
    layers = config.get("target_layer_ids") or []
    if info.num_hidden_layers is not None and layers and max(layers) >= info.num_hidden_layers and not any(
        p.startswith("layer count") for p in problems
    ):
        problems.append(f"target layers read {layers} vs the target's {info.num_hidden_layers}")
    return problems


def plan_methods(requested: list[str] | None, all_methods: list[str], method_draft: dict[str, str], drafts: dict[str, tuple[str, bool]],
                 info, random_drafts: bool = False) -> list[str]:
    """The methods to run, ``plain`` first.

    ``requested``: the ``--methods`` given (None: every method of ``all_methods`` whose draft fits);
    ``method_draft``: the draft each draft-based method uses; ``drafts``: ``{draft name: (folder, given
    by name)}``; ``info``: the target's :class:`~modeling_dflare.target_info.TargetInfo`.
    Raises ``ValueError`` for a draft or method asked for by name that does not fit the target, and
    ``FileNotFoundError`` for a draft folder that is not there.
    """
    methods = ["plain"] + [m for m in (requested or all_methods) if m != "plain"]
    if not random_drafts:
        for name in sorted({method_draft[m] for m in methods if m in method_draft}):
            folder, given = drafts[name]
            users = [m for m in methods if method_draft.get(m) == name]
            if not (Path(folder) / "config.json").is_file():
                raise FileNotFoundError(
                    f"no draft at {folder!r} (expected a folder with config.json and weights): pass "
                    "--draft/--dflash-draft, or --random-drafts for a development run with untrained drafts"
                )
            problems = draft_fit_problems(folder, info)
            if not problems:
                continue
            mismatch = f"the {name} draft {Path(folder).name} does not fit target {info.label} ({', '.join(problems)})"
            if given or requested is not None:
                flag = "--draft" if name == "dflare" else "--dflash-draft"
                raise ValueError(f"{mismatch}: pass {flag} with a draft trained for this target, or leave {', '.join(users)} out of --methods")
            logger.warning("%s: %s dropped (pass %s for a draft of this target)", mismatch, ", ".join(users),
                           "--draft" if name == "dflare" else "--dflash-draft")
            methods = [m for m in methods if m not in users]
    if any(m not in PLAIN_METHODS for m in methods) and "plain-fast" not in methods:
        logger.info("plain-fast added: it tells the verify kernels' gain from the drafting's")
        methods.insert(1, "plain-fast")
    return methods


__all__ = ["PLAIN_METHODS", "draft_fit_problems", "plan_methods"]
