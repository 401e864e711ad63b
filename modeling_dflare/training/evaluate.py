"""``dflare evaluate``: how well a trained draft predicts its target on held-out answers.

The numbers a training run prints on its own held-out split, for any draft and any answer folder,
so drafts can be compared where their users will run them (chat, code, math) without training:

- ``acc@1`` and the implied acceptance length over 64 random anchors per answer (the papers' number);
- the walked acceptance length: the same correctness table walked the way generation walks it (a
  block at the first response token, the next one after the accepted prefix and the bonus token);
- with ``--generate-prompts N``: the acceptance length of ``target.generate(assistant_model=draft)``
  on the first N prompts (greedy, no confidence cut), the number the walk predicts.

Each answer folder is reported on its own (``--heldout a,b``), since the walk of chat and of code
differ by far more than any two drafts do. Evaluate on held-out answers only: never on the prompts
a benchmark reports. A training run evaluates its draft with the same :func:`heldout_accuracy`.
"""

import json
import logging
from pathlib import Path

import torch

from ..anchors import sample_anchors
from ..chat_templates import add_prompt_format_arguments
from .loss import AccuracyMeter
from .sequences import HELDOUT_SEQUENCES, Sequence

logger = logging.getLogger(__name__)


@torch.no_grad()
def heldout_accuracy(draft, loss_fn, heldout: list[Sequence], block_size: int, max_sequences: int = HELDOUT_SEQUENCES) -> dict:
    """Per-position accuracy (plain and conditional), loss and implied acceptance length on held-out
    sequences: 64 random anchors per answer, seeded by its index, so every evaluation of every run
    sees the same anchors. ``loss_fn(sequence, anchors)`` returns the draft's block loss result."""
    was_training = draft.training
    draft.eval()
    meter, losses = AccuracyMeter(block_size), []
    try:
        for index, sequence in enumerate(heldout[:max_sequences]):
            generator = torch.Generator().manual_seed(index)
            anchors = sample_anchors(sequence.response_start, sequence.input_ids.numel(), 64, generator)
            result = loss_fn(sequence, anchors)
            meter.add(result)
            losses.append(result.loss.item())
    finally:
        draft.train(was_training)
    return {
        "loss": round(sum(losses) / max(1, len(losses)), 4),
        "acc": [round(a, 4) for a in meter.accuracy()],
        "conditional_acc": [round(a, 4) for a in meter.conditional_accuracy()],
        "tau": round(meter.acceptance_length(), 4),
    }


def load_draft_and_target(draft_dir: str | Path, heldout_sources: list[str], target=None, tokenizer=None, target_source: str | None = None,
                          prompt_format=None):
    """(draft, target, tokenizer) for a held-out measurement, after checking that the draft folder
    and every held-out source exist (before the target loads) and that the draft fits the target.
    ``prompt_format`` (:class:`~modeling_dflare.chat_templates.PromptFormat`): how chats become prompts
    (default: as the draft was trained, else the target's own chat template)."""
    from ..chat_templates import resolve_prompt_format
    from ..modeling_dflare import DFlareModel
    from ..generation_dflare import check_draft_matches_target
    from ..target_info import check_prompt_format
    from ..targets import load_target, load_tokenizer

    folder = Path(draft_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"draft folder {str(draft_dir)!r} has no config.json (expected a trained DFlare draft folder)")
    for source in heldout_sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"--heldout {source!r} does not exist (expected a regenerated-answers folder or a .json/.jsonl chat file)")
    prompt_format = prompt_format if prompt_format is not None else resolve_prompt_format(None, folder)
    if tokenizer is None:  # a target without a chat template fails here, before it loads
        check_prompt_format(target_source, prompt_format)
    target = target if target is not None else load_target(target_source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(target_source, prompt_format)
    draft = DFlareModel.from_pretrained(folder, dtype=torch.float32)
    check_draft_matches_target(draft, target)
    return draft, target, tokenizer


def evaluate_draft(
    draft_dir: str | Path,
    heldout: str,
    target=None,
    tokenizer=None,
    target_source: str | None = None,
    max_length: int = 768,
    hidden_cache: str | None = None,
    generate_prompts: int = 0,
    max_answers: int = 64,
    prompt_format=None,
) -> dict[str, dict]:
    """Held-out accuracy, implied and walked acceptance of ``draft_dir`` on each comma-separated
    answer source of ``heldout`` (and the acceptance measured in ``generate`` on ``generate_prompts``
    of them); returns ``{source: report}``."""
    from ..anchors import default_gamma, position_weights
    from .consistency import measure_consistency
    from .sequences import read_source, tokenize_conversations
    from .features import TargetFeatures
    from .loss import block_loss, training_head

    sources = [source for source in heldout.split(",") if source]
    draft, target, tokenizer = load_draft_and_target(draft_dir, sources, target, tokenizer, target_source, prompt_format)
    folder = Path(draft_dir)
    block = draft.config.block_size
    weights = position_weights(block, default_gamma(block))
    features = TargetFeatures(target, hidden_cache, tokenizer=tokenizer, max_length=max_length)
    layer_ids = list(draft.config.target_layer_ids)
    embed = target.get_input_embeddings()
    head_weight, token_to_draft = training_head(draft, target)

    def loss_fn(sequence, anchors):
        return block_loss(draft, embed, head_weight, token_to_draft, sequence, features(sequence, layer_ids), anchors, weights, "target")

    reports = {}
    for source in sources:
        sequences, skipped = tokenize_conversations(tokenizer, read_source(source), max_length, max_answers)
        if not sequences:
            raise ValueError(f"--heldout {source!r} holds no usable answer (expected chat records with a user turn and an assistant reply)")
        accuracy = heldout_accuracy(draft, loss_fn, sequences, block, max_answers)
        walked = measure_consistency(draft, target, features, sequences, weights, run_generate=False)
        report = {
            "answers": len(sequences),
            "acc1": accuracy["acc"][0],
            "implied_tau": accuracy["tau"],
            "walk_tau": walked.get("walk_tau"),
            "conditional_acc": accuracy["conditional_acc"],
        }
        if generate_prompts:
            measured = measure_consistency(draft, target, features, sequences[:generate_prompts], weights)
            report.update(generate_prompts=measured.get("prompts"), generate_tau=measured.get("generate_tau"), generate_walk_tau=measured.get("walk_tau"))
        logger.info("%s on %s: %s", folder, source, report)
        reports[source] = report
    return reports


def add_arguments(parser) -> None:
    parser.add_argument("draft", help="trained draft folder")
    parser.add_argument("--heldout", required=True, help="held-out answer folders or chat files, comma-separated (each reported on its own)")
    parser.add_argument("--target", default=None, help="target folder or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-length", type=int, default=768, help="longest answer (prompt + reply) in tokens")
    parser.add_argument("--max-answers", type=int, default=64, help="answers evaluated per source")
    parser.add_argument("--generate-prompts", type=int, default=0, help="also measure τ in generate on this many prompts per source")
    parser.add_argument("--hidden-cache", default=None, help="reuse a training run's target-feature cache")
    parser.add_argument("--output", default=None, help="also write the reports to this JSON file")
    add_prompt_format_arguments(parser)


def run(args) -> int:
    from ..chat_templates import resolve_prompt_format

    if args.threads:
        torch.set_num_threads(args.threads)
    reports = evaluate_draft(
        args.draft, args.heldout, target_source=args.target, max_length=args.max_length, hidden_cache=args.hidden_cache,
        generate_prompts=args.generate_prompts, max_answers=args.max_answers, prompt_format=resolve_prompt_format(args, args.draft),
    )
    text = json.dumps(reports, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


__all__ = ["evaluate_draft", "heldout_accuracy", "load_draft_and_target"]
