"""Should a block's length follow the target's verify cost? The confidence cut against a cost-aware length.

Today a drafted block keeps its leading positions whose cumulative confidence (the product of the
draft's top probabilities) is at least the cut, then the prompt-lookup hybrid may fill the rest.
That rule is optimal when every extra verified token costs the same. On a CPU it does not: the
target's fp32 linears run a matrix-vector-like kernel up to 3 rows and switch to a matrix-matrix
one from 4, so verifying 4 tokens costs a step more than 3 (2-core Xeon with AMX, 2026-12-07:
45 / 49 / 50 / 66 / 67 / 67 / 69 / 75 ms for 1-8 tokens).

The cost-aware rule picks, per block, the number of drafts ``k`` that maximises
``1 + c_1 + ... + c_k - lam * verify(k + 1)``, where ``c_j`` is the cumulative confidence (the
estimate that the first ``j`` drafts are all accepted) and ``lam`` the throughput to beat (tokens
per second): a renewal-reward rule that reduces to a plain cut when every row costs the same.

Both rules are walked over held-out answers (never benchmark prompts) with the cost model of
``dflare tune-cut`` (:func:`~modeling_dflare.training.consistency.walk_costs`), on the measured
forward costs of one ``dflare bench`` report (its small-row verify times, the draft's time per
cycle and a plain step), and the best setting of each is compared. Run from the repository root,
one thread:

    python docs/analysis/cost_aware_length.py DRAFT BENCH_JSON [DATASET]
    # e.g. drafts/smollm2-dflare docs/bench/r24-2026-12-07-xeon-amx.json mtbench
    # writes docs/analysis/cost_aware_length_<date>.json
"""
import datetime
import json
import sys
from pathlib import Path

import torch

from modeling_dflare.anchors import default_gamma, position_weights
from modeling_dflare.training.consistency import cut_lengths, measure_consistency, walk_costs
from modeling_dflare.training.evaluate import load_draft_and_target
from modeling_dflare.training.features import TargetFeatures
from modeling_dflare.training.sequences import read_source, tokenize_conversations

HELDOUT = ("datasets/smollm2-sharegpt/heldout", "datasets/smollm2-codeio/heldout",
           "datasets/smollm2-gsm-symbolic/heldout", "datasets/smollm2-pystubs/heldout")
CUTS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
LOOKUP_CONFIDENCES = (0.5, 0.6, 0.7, 0.8)
CAPS = (2, 3, 4, 5)  # the most tokens one proposal may hold
LAMBDAS = tuple(round(0.6 + 0.1 * i, 1) for i in range(16))  # in plain decoding's throughput


def cost_aware_lengths(confidence: torch.Tensor, verify_s: list[float], lam: float) -> torch.LongTensor:
    """Per block, the number of leading drafts ``k`` maximising ``sum(c_1..c_k) - lam * verify_s[k]``."""
    width = confidence.shape[1]
    gains = torch.cat([torch.zeros(confidence.shape[0], 1), confidence.cumprod(dim=1).cumsum(dim=1)], dim=1)
    costs = torch.tensor([verify_s[min(k, len(verify_s) - 1)] for k in range(width + 1)])
    return (gains - lam * costs).argmax(dim=1)


class Capped:
    """A lookup table whose continuations stop at ``cap`` proposed tokens in all (the kept drafts included)."""

    def __init__(self, table, cap: int):
        self.table, self.cap, self.width = table, cap, table.width

    def __call__(self, position, sure, min_ngram, max_ngram=None):
        count, matched = self.table(position, sure, min_ngram, max_ngram)
        room = max(0, self.cap - sure)
        return min(count, room), min(matched, room)


def predict(walks, verify_s, draft_s, plain_s, lengths, lookup_confidence=None, min_ngram=3, max_ngram=None, cap=None) -> float:
    """Predicted speedup over plain decoding of a length rule ``lengths(confidence)`` (with the hybrid
    when ``lookup_confidence`` is given: the drafts sure at that confidence, then the lookup), every
    proposal cut at ``cap`` tokens when given."""
    tokens = seconds = 0.0
    for runs, confidence, budget, table in walks:
        kept = lengths(confidence)
        if cap is not None:
            kept = kept.clamp(max=cap)
            table = Capped(table, cap)
        sure = torch.minimum(kept, cut_lengths(confidence, lookup_confidence)) if lookup_confidence else None
        got, spent = walk_costs(runs, kept, budget, verify_s, draft_s, sure, table if lookup_confidence else None, min_ngram, max_ngram)
        tokens, seconds = tokens + got, seconds + spent
    return round(tokens * plain_s / seconds, 4)


def main(draft_dir: str, bench_json: str, dataset: str = "mtbench") -> None:
    torch.set_num_threads(1)
    costs = json.loads(Path(bench_json).read_text())
    verify_s = [ms / 1000 for ms in costs["costs"][dataset]["verify_ms_small_rows"]]
    plain_s = costs["costs"][dataset]["verify_ms"][0] / 1000
    row = next(r for r in costs["results"] if r["dataset"] == dataset and r["method"] == "dflare-hybrid")
    draft_s = row["draft_ms_per_cycle"] / 1000
    draft, target, tokenizer = load_draft_and_target(draft_dir, list(HELDOUT))
    block = draft.config.block_size
    weights = position_weights(block, default_gamma(block))
    features = TargetFeatures(target, "runs/hidden-cache", tokenizer=tokenizer, max_length=512)
    walks_by_source = {}
    for source in HELDOUT:
        sequences, _ = tokenize_conversations(tokenizer, read_source(source), 512)
        walks = []
        measure_consistency(draft, target, features, sequences, weights, run_generate=False, walks=walks)
        walks_by_source[Path(source).parent.name] = walks
    everything = [w for walks in walks_by_source.values() for w in walks]
    ngram = draft.config.prompt_lookup_ngram
    shipped = (draft.config.confidence_threshold, draft.config.prompt_lookup_confidence, draft.config.prompt_lookup_min_ngram)

    def cut_rule(threshold):
        return lambda confidence: cut_lengths(confidence, threshold)

    def aware_rule(lam):
        return lambda confidence: cost_aware_lengths(confidence, verify_s, lam / plain_s)

    results = {"cut": {}, "cost_aware": {}, "cut_capped": {}}
    for threshold in CUTS:
        for cap in CAPS:
            results["cut_capped"][f"cut {threshold}, lookup {shipped[1]}, cap {cap}"] = predict(
                everything, verify_s, draft_s, plain_s, cut_rule(threshold), shipped[1], shipped[2], ngram, cap)
    for threshold in CUTS:
        for confidence in LOOKUP_CONFIDENCES:
            results["cut"][f"cut {threshold}, lookup {confidence}"] = predict(everything, verify_s, draft_s, plain_s, cut_rule(threshold), confidence, shipped[2], ngram)
    aware = {(lam, confidence): predict(everything, verify_s, draft_s, plain_s, aware_rule(lam), confidence, shipped[2], ngram)
             for lam in LAMBDAS for confidence in LOOKUP_CONFIDENCES}
    results["cost_aware"] = {f"lam {lam}, lookup {confidence}": v for (lam, confidence), v in aware.items()}
    best = {rule: max(grid, key=grid.get) for rule, grid in results.items()}
    best_lam, best_lookup = max(aware, key=aware.get)
    by_source = {}
    for name, walks in walks_by_source.items():
        by_source[name] = {
            "answers": len(walks),
            "shipped cut": predict(walks, verify_s, draft_s, plain_s, cut_rule(shipped[0]), shipped[1], shipped[2], ngram),
            "cost-aware": predict(walks, verify_s, draft_s, plain_s, aware_rule(best_lam), best_lookup, shipped[2], ngram),
        }
    shipped_key = f"cut {shipped[0]}, lookup {shipped[1]}"
    report = {
        "date": datetime.date.today().isoformat(), "draft": draft_dir, "costs_from": bench_json, "dataset_costs": dataset,
        "verify_ms": [round(1000 * v, 1) for v in verify_s], "draft_ms": round(1000 * draft_s, 1), "plain_ms": round(1000 * plain_s, 1),
        "heldout_answers": len(everything), "shipped": {shipped_key: results["cut"].get(shipped_key)},
        "best": {rule: {key: results[rule][key]} for rule, key in best.items()}, "by_source": by_source, "grid": results,
    }
    out = Path(f"docs/analysis/cost_aware_length_{report['date']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("verify_ms", "draft_ms", "plain_ms", "heldout_answers", "shipped", "best", "by_source")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
