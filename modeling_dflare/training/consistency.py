"""Does what training measures show up in ``generate``? The check for the classic port bug
("0.99 training accuracy, 12 % acceptance": mask, positions, layers or template disagree).

On the same held-out prompts it reports three acceptance lengths, all without a confidence cut:

* ``implied_tau``: 1 + the mean leading run of correct drafts over blocks anchored at *every*
  position of the first ``max_new_tokens`` response tokens (what the per-position conditional
  accuracy implies: position k counts only when 1..k-1 were right);
* ``walk_tau``: the same correctness table walked the way generation walks it (a block at the
  first response token, the next one right after the accepted prefix and the bonus token), which
  is what ``generate`` should measure when the target reproduces the held-out answer;
* ``generate_tau``: measured by ``target.generate(assistant_model=draft)`` on those prompts.

``walk_ratio`` and ``implied_ratio`` are ``generate_tau`` over each; both within 10 % of 1 is the
target (the answers were regenerated in bf16 and the measurement uses the fp32 target, so small
divergences are expected where the two precisions pick different tokens).
"""

import logging

import torch

from ..modeling_dflare import DFlareModel
from .data import Sequence
from .features import TargetFeatures
from .loss import block_loss

logger = logging.getLogger(__name__)


def leading_runs(correct: torch.BoolTensor) -> torch.LongTensor:
    """Per block (row), the number of leading correct drafted positions."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def walk(runs: torch.LongTensor, budget: int) -> tuple[int, int]:
    """(tokens, cycles) of generation walking blocks anchored at response positions 0, 1, ...:
    a cycle at position p gains ``runs[p] + 1`` tokens, until ``budget`` tokens after the first."""
    position, tokens, cycles = 0, 0, 0
    while position < runs.numel() and tokens < budget:
        gained = min(int(runs[position]) + 1, budget - tokens)
        tokens, cycles, position = tokens + gained, cycles + 1, position + gained
    return tokens, cycles


@torch.no_grad()
def measure_consistency(
    draft: DFlareModel,
    target,
    features: TargetFeatures,
    sequences: list[Sequence],
    weights: torch.Tensor,
    max_new_tokens: int = 96,
) -> dict:
    """Implied, walked and measured acceptance length on ``sequences``' prompts (see the module doc)."""
    was_training = draft.training
    draft.eval()
    embed, head = target.get_input_embeddings(), target.get_output_embeddings().weight.detach()
    ids = draft.draft_vocab_ids
    head_weight = head if ids is None else head[ids.to(head.device)]
    token_to_draft = None
    if ids is not None:
        token_to_draft = torch.full((head.shape[0],), -1, dtype=torch.long, device=head.device)
        token_to_draft[ids.to(head.device)] = torch.arange(ids.numel(), device=head.device)
    layer_ids = list(draft.config.target_layer_ids)
    all_runs, walk_tokens, walk_cycles, gen_tokens, gen_cycles = [], 0, 0, 0, 0
    threshold = draft.config.confidence_threshold
    draft.config.confidence_threshold = 0.0
    try:
        for sequence in sequences:
            # The first generated token comes from the target's prefill; blocks start there.
            # Generation covers the held-out answer's length (without the closing template token),
            # so both sides walk the same text as long as the target reproduces it.
            first = sequence.response_start
            new_tokens = min(max_new_tokens, sequence.input_ids.numel() - 1 - first)
            last = first + new_tokens - 2
            if last < first:
                continue
            anchors = torch.arange(first, last + 1)
            result = block_loss(
                draft, embed, head_weight, token_to_draft, sequence, features(sequence, layer_ids), anchors, weights, "target"
            )
            runs = leading_runs(result.correct & result.valid)
            all_runs.append(runs)
            tokens, cycles = walk(runs, new_tokens - 1)
            walk_tokens, walk_cycles = walk_tokens + tokens, walk_cycles + cycles
            prompt = sequence.input_ids[:first][None].to(target.device)
            target.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                assistant_model=draft,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            stats = draft.dflare_stats
            gen_tokens += sum(stats.accepted) + stats.cycles
            gen_cycles += stats.cycles
    finally:
        draft.config.confidence_threshold = threshold
        draft.train(was_training)
    if not all_runs or not gen_cycles or not walk_cycles:
        return {}
    implied = 1.0 + torch.cat(all_runs).float().mean().item()
    walked, measured = walk_tokens / walk_cycles, gen_tokens / gen_cycles
    report = {
        "prompts": len(all_runs),
        "max_new_tokens": max_new_tokens,
        "block_size": draft.config.block_size,
        "implied_tau": round(implied, 4),
        "walk_tau": round(walked, 4),
        "generate_tau": round(measured, 4),
        "implied_ratio": round(measured / implied, 4),
        "walk_ratio": round(measured / walked, 4),
    }
    logger.info("train/inference consistency: %s", report)
    return report


__all__ = ["leading_runs", "measure_consistency", "walk"]
