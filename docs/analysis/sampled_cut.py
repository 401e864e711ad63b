"""Does the confidence cut suit sampling? Predicted speed of cut rules at temperature 0.7 and 1.0.

Under greedy decoding a drafted token is accepted when it is the target's argmax, and the draft's
top probability estimates exactly that, so the cut (keep the leading drafts whose cumulative top
probability is at least ``confidence_threshold``) is the right rule there. Under sampling with the
sampled proposal (the default), a drafted position is accepted with probability
``1 - TV(p_T, q_T) = sum_x min(p_T(x), q_T(x))``: the overlap of the target's and the draft's
temperature-adjusted distributions. A flat distribution the draft matches is accepted surely while
its top probability is low, so the greedy cut may stop blocks that sampling would accept, or keep
ones it would reject.

This walks the held-out answers (never benchmark prompts): for every block anchored in the first
96 response tokens it computes the draft's distribution at each block position (one draft pass per
answer, over the cached target features) and the target's at the same position (one target
forward per answer), and from them the expected accepted tokens of a block that proposes its first
``k`` drafts, ``sum_i prod_{j<=i} a_j`` with ``a_j`` the overlap (sampled proposal) or ``p_T`` of the
draft's argmax (argmax proposal). Each rule picks ``k`` per block; its predicted speedup over plain
decoding is (blocks' tokens / blocks' seconds) x a plain step's seconds, the seconds being the draft
pass plus the verify of ``k + 1`` tokens measured by one ``dflare bench`` report. Blocks are
weighted alike (every anchor once), which overstates long runs in absolute terms; the comparison
between rules at one temperature is what it is for. The target's distribution is taken along the
held-out (greedy) answer, not along a sampled one.

Rules: the cut on the draft's top probability as shipped (untempered), the same cut on the
tempered top probability, a fixed length, and the cut on the true overlap (an oracle no generator
has, which bounds what any estimate of acceptance could gain). Run from the repository root, one
thread:

    python docs/analysis/sampled_cut.py DRAFT BENCH_JSON [DATASET]
    # e.g. drafts/smollm2-dflare docs/bench/r24-2026-12-07-xeon-amx.json mtbench
    # writes docs/analysis/sampled_cut_<date>.json
"""
import datetime
import json
import sys
from pathlib import Path

import torch

from modeling_dflare.anchors import block_inputs, block_mask
from modeling_dflare.training.consistency import cut_lengths as cut
from modeling_dflare.training.evaluate import load_draft_and_target
from modeling_dflare.training.features import TargetFeatures
from modeling_dflare.training.loss import training_head
from modeling_dflare.training.sequences import read_source, tokenize_conversations

HELDOUT = ("datasets/smollm2-sharegpt/heldout", "datasets/smollm2-codeio/heldout",
           "datasets/smollm2-gsm-symbolic/heldout", "datasets/smollm2-pystubs/heldout")
TEMPERATURES = (0.0, 0.7, 1.0)
CUTS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
MAX_NEW_TOKENS = 96


@torch.no_grad()
def block_tables(draft, target, features, sequence, head_weight, head_ids, temperatures):
    """Per temperature: ``(accept_sampled, accept_argmax, top, top_tempered)``, each ``[A, B-1]`` over
    the blocks anchored at the first response tokens (temperature 0: both acceptances are 1 where the
    draft's argmax is the target's, else 0)."""
    block = draft.config.block_size
    first = sequence.response_start
    new_tokens = min(MAX_NEW_TOKENS, sequence.input_ids.numel() - 1 - first)
    last = first + new_tokens - 2
    if last < first:
        return None
    ids = sequence.input_ids
    anchors = torch.arange(first, last + 1)
    tokens, positions, _ = block_inputs(ids, anchors, block, draft.config.mask_token_id)
    length = ids.shape[0]
    embed = target.get_input_embeddings()
    out = draft(
        noise_embeds=embed(tokens)[None].float(),
        context_hidden_states=features(sequence, list(draft.config.target_layer_ids)).hidden.float(),
        position_ids=torch.cat([torch.arange(length), positions])[None],
        attention_mask=block_mask(anchors, length, block)[None, None],
    )
    hidden = out.last_hidden_state[0].view(anchors.numel(), block, -1)[:, 1:]
    draft_logits = hidden @ head_weight.T  # [A, B-1, draft vocab]
    target_logits = target(ids[None]).logits[0].float()  # row t: the distribution of token t + 1
    rows = (anchors[:, None] + torch.arange(block - 1)[None]).clamp(max=length - 1)  # draft j+1 predicts token a+j+1
    p_logits = target_logits[rows]  # [A, B-1, V]
    top = torch.softmax(draft_logits, dim=-1).amax(-1)
    choice = head_ids[draft_logits.argmax(-1)] if head_ids is not None else draft_logits.argmax(-1)
    tables = {}
    for t in temperatures:
        if t == 0:
            hit = (choice == p_logits.argmax(-1)).float()
            tables[t] = (hit, hit, top, top)
            continue
        p = torch.softmax(p_logits / t, dim=-1)
        q_small = torch.softmax(draft_logits / t, dim=-1)
        if head_ids is not None:
            q = torch.zeros_like(p)
            q[..., head_ids] = q_small
        else:
            q = q_small
        overlap = torch.minimum(p, q).sum(-1)
        argmax_accept = p.gather(-1, choice[..., None])[..., 0]
        tables[t] = (overlap, argmax_accept, top, q_small.amax(-1))
    return tables


def expected_tokens(accept: torch.Tensor, kept: torch.LongTensor) -> torch.Tensor:
    """Per block: 1 (the target's own token) + the expected accepted drafts among the first ``kept``."""
    reach = accept.cumprod(dim=1)
    mask = torch.arange(accept.shape[1])[None] < kept[:, None]
    return 1 + (reach * mask).sum(dim=1)


def main(draft_dir: str, bench_json: str, dataset: str = "mtbench") -> None:
    torch.set_num_threads(1)
    costs = json.loads(Path(bench_json).read_text())
    verify_s = torch.tensor([ms / 1000 for ms in costs["costs"][dataset]["verify_ms_small_rows"]])
    plain_s = costs["costs"][dataset]["verify_ms"][0] / 1000
    row = next(r for r in costs["results"] if r["dataset"] == dataset and r["method"] == "dflare-hybrid")
    draft_s = row["draft_ms_per_cycle"] / 1000
    draft, target, tokenizer = load_draft_and_target(draft_dir, list(HELDOUT))
    draft.eval()
    head_weight, _ = training_head(draft, target)
    head_weight = head_weight.float()
    head_ids = draft.draft_vocab_ids
    features = TargetFeatures(target, "runs/hidden-cache", tokenizer=tokenizer, max_length=512)
    per_t: dict[float, list] = {t: [] for t in TEMPERATURES}
    answers = {}
    for source in HELDOUT:
        sequences, _ = tokenize_conversations(tokenizer, read_source(source), 512)
        answers[Path(source).parent.name] = len(sequences)
        for sequence in sequences:
            tables = block_tables(draft, target, features, sequence, head_weight, head_ids, TEMPERATURES)
            if tables is None:
                continue
            for t, table in tables.items():
                per_t[t].append(table)
    width = draft.config.block_size - 1

    def speed(accept, kept):
        tokens = expected_tokens(accept, kept).sum()
        seconds = (draft_s + verify_s[kept.clamp(max=verify_s.numel() - 1)]).sum()
        return round(float(tokens / seconds * plain_s), 4)

    report = {
        "date": datetime.date.today().isoformat(), "draft": draft_dir, "costs_from": bench_json, "dataset_costs": dataset,
        "verify_ms": [round(1000 * float(v), 1) for v in verify_s], "draft_ms": round(1000 * draft_s, 1),
        "plain_ms": round(1000 * plain_s, 1), "answers": answers, "shipped_cut": draft.config.confidence_threshold,
        "temperatures": {},
    }
    for t, tables in per_t.items():
        overlap, argmax_accept, top, top_t = (torch.cat(parts) for parts in zip(*tables))
        grid = {"blocks": int(overlap.shape[0]),
                "mean acceptance per position, sampled proposal": [round(float(v), 3) for v in overlap.mean(0)],
                "mean acceptance per position, argmax proposal": [round(float(v), 3) for v in argmax_accept.mean(0)]}
        for name, accept in (("sampled", overlap), ("argmax", argmax_accept)):
            grid[f"{name}: cut on the top probability"] = {str(c): speed(accept, cut(top, c)) for c in CUTS}
            grid[f"{name}: cut on the tempered top probability"] = {str(c): speed(accept, cut(top_t, c)) for c in CUTS}
            grid[f"{name}: fixed length"] = {str(k): speed(accept, torch.full_like(cut(top, 0), k)) for k in range(1, width + 1)}
            grid[f"{name}: cut on the true acceptance (oracle)"] = {str(c): speed(accept, cut(accept, c)) for c in CUTS}
        report["temperatures"][str(t)] = grid
    out = Path(f"docs/analysis/sampled_cut_{report['date']}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    for t, grid in report["temperatures"].items():
        print(f"T={t}")
        for key, value in grid.items():
            print(f"  {key}: {value}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
