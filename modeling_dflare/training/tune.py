"""``dflare tune-cut``: choose a trained draft's confidence cut for the machine it will run on.

The cut that ``dflare train --tune-threshold`` picks depends on the target's measured forward
times, so it is only right for the machine (and thread count) it was timed on. A publisher who
trained elsewhere, or a run trained with ``--threads 1`` beside another job, re-chooses it here:
the draft walks the held-out answers once (no ``generate`` per candidate), the target and draft
costs are timed with the threads generation will use, and the cost model of
:func:`~modeling_dflare.training.consistency.choose_threshold` predicts the speedup of every cut. A draft with the prompt-lookup hybrid on gets the cut, the lookup
confidence and the shortest n-gram chosen together (the walk replays the hybrid too).

The chosen values are written into the draft's ``config.json`` (nothing else in it changes); when the
folder has a ``training_summary.json``, the new tuning replaces its ``threshold_tuning`` (the
previous one is kept under ``previous``) and the model card is rewritten to say so. Each file is
rewritten through a temporary file and a rename, so an interruption never leaves a torn config.
"""

import datetime
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def tune_cut(
    draft_dir: str | Path,
    heldout: str,
    target=None,
    tokenizer=None,
    target_source: str | None = None,
    threads: int | None = None,
    max_length: int = 512,
    hidden_cache: str | None = None,
    write: bool = True,
    prompt_format=None,
) -> dict:
    """Re-choose ``draft_dir``'s confidence cut on the ``heldout`` answers; returns the tuning record.

    ``threads`` (default: torch's current setting) is what the target and draft are timed with:
    pass the thread count generation will run with, on an otherwise quiet machine. ``prompt_format``:
    how chats become prompts (default: as the draft was trained, else the target's own chat template).
    """
    from ..anchors import default_gamma, position_weights
    from .consistency import tune_threshold
    from .sequences import read_source, tokenize_conversations
    from .evaluate import load_draft_and_target
    from .features import TargetFeatures

    folder = Path(draft_dir)
    sources = [source for source in str(heldout).split(",") if source]
    draft, target, tokenizer = load_draft_and_target(draft_dir, sources, target, tokenizer, target_source, prompt_format)
    sequences, groups = [], []
    for source in sources:
        answers, _ = tokenize_conversations(tokenizer, read_source(source), max_length)
        if not answers:
            raise ValueError(f"--heldout {source!r} holds no usable answer (expected chat records with a user turn and an assistant reply)")
        sequences += answers
        groups += [source] * len(answers)
    block = draft.config.block_size
    weights = position_weights(block, default_gamma(block))
    features = TargetFeatures(target, hidden_cache, tokenizer=tokenizer, max_length=max_length)
    tuning = tune_threshold(draft, target, features, sequences, weights, threads,
                            groups=groups if len(sources) > 1 else None)
    tuning.update(tool="dflare tune-cut", heldout=str(heldout), date=datetime.date.today().isoformat())
    previous = draft.config.confidence_threshold
    logger.info("confidence cut %s -> %s (predicted speedup by cut: %s)", previous, tuning["best"], tuning["predicted_speedup"])
    if "hybrid" in tuning:
        logger.info("prompt-lookup hybrid: %s, predicted %sx", tuning["hybrid"]["best"], tuning["hybrid"]["predicted"])
    if "by_source" in tuning:
        logger.info("predicted speedup of the chosen settings by held-out source: %s", tuning["by_source"])
    if write:
        _write_back(folder, draft, tuning, previous)
    return tuning


def _write_back(folder: Path, draft, tuning: dict, previous_cut: float) -> None:
    """The chosen values into config.json (only those keys), the summary and the model card."""
    from ..data import write_text_atomic
    from .card import write_card
    from .consistency import tuned_settings

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    chosen = tuned_settings(tuning)
    config.update(chosen)
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    summary_path = folder / "training_summary.json"
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    old = summary.get("threshold_tuning") or {}
    tuning["previous"] = {"best": old.get("best", previous_cut), "threads": old.get("threads"), "tool": old.get("tool", "dflare train --tune-threshold")}
    summary["threshold_tuning"] = tuning
    write_text_atomic(summary_path, json.dumps(summary, indent=2))
    for key, value in chosen.items():
        setattr(draft.config, key, value)
    write_card(folder, draft, summary)


def add_arguments(parser) -> None:
    parser.add_argument("draft", help="trained draft folder (its config.json gets the new cut)")
    parser.add_argument("--heldout", required=True, help="held-out answers the cut is chosen on (never benchmark prompts); "
                        "comma-separated folders are pooled, and the prediction of the chosen settings is shown for each")
    parser.add_argument("--target", default=None, help="target folder or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=None, help="threads to time with: the ones generation will use (default: torch's)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden-cache", default=None, help="reuse a training run's target-feature cache")
    parser.add_argument("--dry-run", action="store_true", help="print the tuning, write nothing")
    from ..chat_templates import add_prompt_format_arguments

    add_prompt_format_arguments(parser)


def run(args) -> int:
    from ..chat_templates import resolve_prompt_format

    tuning = tune_cut(
        args.draft, args.heldout, target_source=args.target, threads=args.threads, max_length=args.max_length,
        hidden_cache=args.hidden_cache, write=not args.dry_run, prompt_format=resolve_prompt_format(args, args.draft),
    )
    shown = {k: tuning[k] for k in ("best", "predicted_speedup", "verify_ms", "draft_ms", "plain_ms", "threads", "heldout_answers", "by_source")
             if k in tuning}
    if "hybrid" in tuning:
        shown["hybrid"] = {k: tuning["hybrid"][k] for k in ("best", "predicted", "draft_alone_best")}
    print(json.dumps(shown, indent=2))
    return 0


__all__ = ["tune_cut"]
