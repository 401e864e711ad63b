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
divergences are expected where the two precisions pick different tokens). The uniform average over
anchors overstates acceptance wherever good and bad stretches alternate (generation crosses a good
stretch in a few long cycles, the anchor average counts every position in it), so ``walk_tau`` is
the predictor to trust; ``implied_tau`` is kept because it is what the papers report.

:func:`choose_threshold` reuses the same walk to pick the confidence cut: with the target's
measured forward cost for 1..B tokens and the draft's cost per block, every candidate cut gives a
predicted speedup over plain decoding, without running ``generate`` once per candidate. For a
draft with the prompt-lookup hybrid on, the walk also replays the hybrid (:class:`LookupTable`:
which continuation the context offers after the kept drafts and how much of it the answer
follows), and the cut, the lookup confidence and the shortest and longest n-gram are chosen together.
"""

import copy
import logging

import torch

from ..modeling_dflare import DFlareModel
from .sequences import Sequence
from .features import TargetFeatures
from .loss import block_loss, training_head

logger = logging.getLogger(__name__)


#: The longest n-grams the tuner tries for the hybrid's lookup (a longer one finds fewer matches
#: but surer ones: on held-out code answers of SmolLM2, 4-6 followed the answer further than 3).
LOOKUP_NGRAMS = (3, 4, 6)


def leading_runs(correct: torch.BoolTensor) -> torch.LongTensor:
    """Per block (row), the number of leading correct drafted positions."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def cut_lengths(confidence: torch.Tensor, threshold: float) -> torch.LongTensor:
    """Per block, how many leading drafts survive the confidence cut (cumulative product >= threshold)."""
    if threshold <= 0:
        return torch.full((confidence.shape[0],), confidence.shape[1], dtype=torch.long)
    return (confidence.cumprod(dim=1) >= threshold).long().cumprod(dim=1).sum(dim=1)


class LookupTable:
    """What the prompt-lookup hybrid would propose along one held-out answer, for the cost model.

    ``ids`` is the tokenised conversation and ``first`` its first response token; the block at
    response position ``p`` is anchored at ``first + p`` and has ``width`` draft positions. Calling
    the table with ``(p, sure, min_ngram[, max_ngram])`` gives ``(count, matched)``: the length of the
    lookup continuation that replaces the drafts after the ``sure`` kept ones (0: no n-gram match,
    the drafts stand) and how many of its leading tokens the answer goes on with. ``max_ngram``
    (the longest n-gram looked up) defaults to the one the table was made with. Memoised, since
    the tuner's grid walks the same blocks many times.
    """

    def __init__(self, ids: torch.LongTensor, first: int, max_ngram: int, width: int):
        self.ids, self.first, self.max_ngram, self.width = ids.cpu(), first, max_ngram, width
        self._memo: dict[tuple[int, int, int, int], tuple[int, int]] = {}

    def __call__(self, position: int, sure: int, min_ngram: int, max_ngram: int | None = None) -> tuple[int, int]:
        longest = max_ngram or self.max_ngram
        key = (position, sure, min_ngram, longest)
        if key not in self._memo:
            from ..generation_dflare import ngram_continuation

            end = self.first + position + 1 + sure  # the anchor and the kept drafts, as if all were right
            found = ngram_continuation(self.ids[:end], longest, self.width - sure, min_ngram)
            truth = self.ids[end : end + found.numel()]
            matched = int((found[: truth.numel()] == truth).long().cumprod(0).sum())
            self._memo[key] = (found.numel(), matched)
        return self._memo[key]


def walk_costs(
    runs: torch.LongTensor, kept: torch.LongTensor, budget: int, verify_s: list[float], draft_s: float,
    sure: torch.LongTensor | None = None, lookup: LookupTable | None = None, min_ngram: int = 1, max_ngram: int | None = None,
) -> tuple[int, float]:
    """(tokens, seconds) of generation walking the blocks with ``kept[p]`` drafts proposed at position p.

    With ``sure`` and ``lookup`` (the prompt-lookup hybrid): of the kept drafts only the first
    ``sure[p]`` stay when the lookup finds a continuation of at least ``min_ngram`` (and at most
    ``max_ngram``, default the table's) tokens' match, which then fills the block, exactly as
    :class:`~modeling_dflare.DFlareCandidateGenerator` does.
    """
    runs_, kept_ = runs.tolist(), kept.tolist()
    sure_ = sure.tolist() if sure is not None and lookup is not None else None
    position, tokens, seconds = 0, 0, 0.0
    while position < len(runs_) and tokens < budget:
        proposed = kept_[position]
        accepted = min(runs_[position], proposed)
        if sure_ is not None:
            keep = min(sure_[position], proposed)
            if keep < lookup.width:
                count, matched = lookup(position, keep, min_ngram, max_ngram)
                if count:
                    proposed = keep + count
                    accepted = keep + matched if runs_[position] >= keep else runs_[position]
        gained = min(accepted + 1, budget - tokens)
        seconds += draft_s + verify_s[min(proposed, len(verify_s) - 1)]
        tokens, position = tokens + gained, position + gained
    return tokens, seconds


def choose_threshold(
    walks: list[tuple],
    verify_s: list[float],
    draft_s: float,
    thresholds=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    plain_s: float | None = None,
    lookup_confidences=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    min_ngrams=(1, 2, 3),
    max_ngrams=LOOKUP_NGRAMS,
) -> dict:
    """Predicted speedup over plain decoding for each confidence cut; ``best`` is the cut to ship.

    ``walks`` holds ``(runs, confidence, budget)`` per held-out answer, plus a :class:`LookupTable`
    as a fourth item when the draft has the prompt-lookup hybrid on; ``verify_s[n]`` is the
    target's forward time for ``n + 1`` tokens on the kernels generation verifies on, and
    ``plain_s`` one plain decoding step (default ``verify_s[0]``).

    ``predicted_speedup`` is the draft alone. With lookup tables, ``hybrid`` also walks every
    (cut, lookup confidence, shortest n-gram, longest n-gram) of the grid (a shortest above the
    longest left out; ``max_ngrams=None``: only the tables' own longest) and its ``best`` settings
    are what the draft ships with (the hybrid is what ``generate`` runs then), so ``best`` is its cut.
    """
    plain_step = plain_s or verify_s[0]

    def predict(threshold: float, lookup_confidence: float | None = None, min_ngram: int = 1, max_ngram: int | None = None) -> float:
        tokens = seconds = 0.0
        for runs, confidence, budget, *rest in walks:
            table = rest[0] if rest and lookup_confidence is not None else None
            sure = cut_lengths(confidence, max(threshold, lookup_confidence)) if table is not None else None
            got, spent = walk_costs(runs, cut_lengths(confidence, threshold), budget, verify_s, draft_s, sure, table, min_ngram, max_ngram)
            tokens, seconds = tokens + got, seconds + spent
        return round(tokens * plain_step / seconds, 4) if seconds else 0.0

    predicted = {threshold: predict(threshold) for threshold in thresholds}
    best = max(predicted, key=predicted.get)
    record = {
        "predicted_speedup": {str(k): v for k, v in predicted.items()},
        "best": best,
        "verify_ms": [round(1000 * v, 2) for v in verify_s],
        "draft_ms": round(1000 * draft_s, 2),
        "plain_ms": round(1000 * plain_step, 2),
    }
    tables = [w[3] for w in walks if len(w) > 3 and w[3] is not None]
    if tables:
        longest_ngrams = max_ngrams or (tables[0].max_ngram,)
        grid = {
            (threshold, confidence, n, m): predict(threshold, confidence, n, m)
            for threshold in thresholds for confidence in lookup_confidences for m in longest_ngrams for n in min_ngrams if n <= m
        }
        threshold, confidence, n, m = max(grid, key=grid.get)
        record["hybrid"] = {
            "predicted_speedup": {f"cut {k[0]}, lookup confidence {k[1]}, min n-gram {k[2]}, max n-gram {k[3]}": v for k, v in grid.items()},
            "best": {
                "confidence_threshold": threshold, "prompt_lookup_confidence": confidence, "prompt_lookup_min_ngram": n, "prompt_lookup_ngram": m,
            },
            "predicted": grid[(threshold, confidence, n, m)],
            "draft_alone_best": best,
        }
        record["best"] = threshold
    return record


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
    run_generate: bool = True,
    walks: list | None = None,
) -> dict:
    """Implied, walked and measured acceptance length on ``sequences``' prompts (see the module doc).

    ``run_generate=False`` skips the ``generate`` side (cheap: one draft pass per answer). When
    ``walks`` is a list, ``(runs, confidence, budget)`` of every answer is appended to it for
    :func:`choose_threshold`.
    """
    was_training = draft.training
    draft.eval()
    embed = target.get_input_embeddings()
    head_weight, token_to_draft = training_head(draft, target)
    layer_ids = list(draft.config.target_layer_ids)
    all_runs, walk_tokens, walk_cycles, gen_tokens, gen_cycles = [], 0, 0, 0, 0
    threshold = draft.config.confidence_threshold
    draft.config.confidence_threshold = 0.0
    # the draft as trained (not its int8 CPU copy): this compares the model with itself
    exact_config = copy.deepcopy(target.generation_config)
    exact_config.dflare_int8_draft = False
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
                draft, embed, head_weight, token_to_draft, sequence, features(sequence, layer_ids), anchors, weights, "target",
                with_confidence=walks is not None,
            )
            runs = leading_runs(result.correct & result.valid)
            all_runs.append(runs)
            tokens, cycles = walk(runs, new_tokens - 1)
            walk_tokens, walk_cycles = walk_tokens + tokens, walk_cycles + cycles
            if walks is not None:
                ngram = int(getattr(draft.config, "prompt_lookup_ngram", 0))
                table = LookupTable(sequence.input_ids, first, ngram, result.confidence.shape[1]) if ngram > 0 else None
                walks.append((runs.cpu(), result.confidence.cpu(), new_tokens - 1, table))
            if not run_generate:
                continue
            prompt = sequence.input_ids[:first][None].to(target.device)
            target.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                assistant_model=draft,
                generation_config=exact_config,
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
    if not all_runs or not walk_cycles or (run_generate and not gen_cycles):
        return {}
    implied = 1.0 + torch.cat(all_runs).float().mean().item()
    walked = walk_tokens / walk_cycles
    report = {
        "prompts": len(all_runs),
        "max_new_tokens": max_new_tokens,
        "block_size": draft.config.block_size,
        "implied_tau": round(implied, 4),
        "walk_tau": round(walked, 4),
    }
    if run_generate:
        measured = gen_tokens / gen_cycles
        report.update(
            generate_tau=round(measured, 4), implied_ratio=round(measured / implied, 4), walk_ratio=round(measured / walked, 4)
        )
    logger.info("train/inference consistency: %s", report)
    return report


def monotone_fit(seconds: list[float]) -> list[float]:
    """Smooth per-length forward timings (index n: n + 1 tokens) without hiding the one-token step.

    A forward of one token runs matrix-vector kernels; two or more tokens switch to matrix-matrix
    ones, which on a CPU cost a step more (here about 58 vs 85 ms) and then grow slowly. So the
    one-token time is kept as measured (capped by the fitted two-token time), and lengths >= 2 get
    a least-squares line ``a + b * n`` (b >= 0): single timings on a busy CPU jump around by 2x,
    and a verify of n tokens does not get cheaper with n.
    """
    if len(seconds) <= 1:
        return [max(1e-6, s) for s in seconds]
    n = torch.arange(2, len(seconds) + 1, dtype=torch.float64)
    y = torch.tensor(seconds[1:], dtype=torch.float64)
    slope = max(0.0, float(((n - n.mean()) * (y - y.mean())).sum() / ((n - n.mean()) ** 2).sum())) if len(y) > 1 else 0.0
    intercept = float(y.mean() - slope * n.mean())
    fitted = [max(1e-6, intercept + slope * float(k)) for k in n]
    return [max(1e-6, min(seconds[0], fitted[0]))] + fitted


@torch.no_grad()
def measure_costs(draft: DFlareModel, target, sequence: Sequence, repeats: int = 7) -> tuple[list[float], float, float]:
    """(target forward seconds for 1..B new tokens after ``sequence``'s prompt on the kernels
    generation verifies on, draft seconds per block, one plain decoding step in seconds).

    ``repeats`` rounds each time the plain step, then every verify length (each after a warm-up
    forward); the results are medians over the rounds, the verify times smoothed by :func:`monotone_fit`.
    Verify forwards carry the hidden states the draft reads and run the small-row kernels of
    :func:`~modeling_dflare.cpu_kernels_dflare.small_row_linears`; the plain step runs the stock kernels,
    as plain ``generate`` does. The draft is timed as ``generate`` runs it on this machine (bf16 where that is
    native, else its int8 copy) with its context K/V cached, as in generation.
    """
    import copy
    import statistics
    import time

    from transformers import DynamicCache

    from ..timing import measure_forward_costs
    from ..generation_dflare import cache_argument, hidden_state_request
    from ..cpu_kernels_dflare import draft_for_generation, draft_head, fast_draft_dtype, small_row_linears

    block = draft.config.block_size
    prompt = sequence.input_ids[: sequence.response_start][None].to(target.device)
    request = hidden_state_request(draft.config.target_layer_ids)
    cache = DynamicCache(config=target.config)
    out = target(prompt, **{cache_argument(target): cache}, use_cache=True, output_hidden_states=request)  # the one prompt pass
    # The plain step and the verify lengths are timed in the same rounds, so a slow spell of a shared
    # machine lands on both alike: the speedup the cut is chosen by is their ratio (timed one after the
    # other, two training runs' plain steps read 147 and 84.5 ms against about equal verify times).
    plain_rounds, verify_rounds = [], []
    for _ in range(repeats):
        plain_rounds.append(measure_forward_costs(target, prompt, 1, 1, time.perf_counter, cache=cache)[0])
        with small_row_linears(target):
            verify_rounds.append(
                measure_forward_costs(target, prompt, block, 1, time.perf_counter, cache=cache, output_hidden_states=request)
            )
    plain = statistics.median(plain_rounds)
    verify = monotone_fit([statistics.median(round_[n] for round_ in verify_rounds) for n in range(block)])
    # the draft as generate runs it here: its fastest dtype, as the int8 copy where that applies
    shipped = copy.deepcopy(draft).to(fast_draft_dtype(target.device)).eval()
    head_rows, _ = draft_head(shipped, target.get_output_embeddings().weight)
    runner, head_product, _ = draft_for_generation(shipped, head_rows)
    layers = [i + 1 for i in draft.config.target_layer_ids]
    context = torch.cat([out.hidden_states[i] for i in layers], dim=-1).to(shipped.dtype)
    embed = target.get_input_embeddings()
    noise = embed(torch.full((1, block), draft.config.mask_token_id, device=target.device)).to(shipped.dtype)
    # as in generation: the context K/V are cached, and each cycle ingests a few newly accepted
    # positions (two here, about the acceptance length) with the block
    new = min(2, context.shape[1] - 1)
    length = context.shape[1]
    draft_cache = DynamicCache(config=shipped.config)
    runner(noise_embeds=noise, context_hidden_states=context[:, : length - new], use_cache=True, past_key_values=draft_cache,
           position_ids=torch.arange(length - new + block, device=target.device)[None])
    draft_cache.crop(-block)
    positions = torch.arange(length - new, length + block, device=target.device)[None]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        hidden = runner(
            noise_embeds=noise, context_hidden_states=context[:, length - new :], position_ids=positions, use_cache=True,
            past_key_values=draft_cache,
        ).last_hidden_state[:, 1:]
        head_product(hidden)
        times.append(time.perf_counter() - start)
        draft_cache.crop(-(new + block))
    return verify, statistics.median(times[1:]), plain


def tuned_settings(tuning: dict) -> dict:
    """The config values a tuning record chooses: the cut, plus the hybrid's two when it was tuned."""
    if "hybrid" in tuning:
        return dict(tuning["hybrid"]["best"])
    return {"confidence_threshold": tuning["best"]}


def tune_threshold(
    draft: DFlareModel,
    target,
    features: TargetFeatures,
    sequences: list[Sequence],
    weights: torch.Tensor,
    threads: int | None = None,
    groups: list[str] | None = None,
) -> dict:
    """Choose the confidence cut on ``sequences`` (held-out answers, never benchmark prompts): one walk
    per answer, then the target and draft timed with ``threads`` (default: the current setting, put
    back afterwards) on a quiet machine. :func:`choose_threshold`'s record plus ``heldout_answers``
    and ``threads``. With ``groups`` (a name per sequence, e.g. its held-out folder) the choice is
    made on all answers pooled, and ``by_source`` holds each group's answer count and predicted
    speedup at the chosen settings."""
    names = groups if groups is not None else [None] * len(sequences)
    if len(names) != len(sequences):
        raise ValueError(f"groups names {len(names)} answers but {len(sequences)} were given (expected one group per answer)")
    walks: list = []
    walks_by_group: dict = {}
    for name in dict.fromkeys(names):  # a too-short answer is not walked: each group's walks are its own
        own = walks_by_group.setdefault(name, [])
        measure_consistency(draft, target, features, [s for s, g in zip(sequences, names) if g == name], weights, run_generate=False, walks=own)
        walks += own
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        verify_s, draft_s, plain_s = measure_costs(draft, target, sequences[0])
        timed_with = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    tuning = choose_threshold(walks, verify_s, draft_s, plain_s=plain_s)
    tuning.update(heldout_answers=len(walks), threads=timed_with)
    if groups is not None:
        tuning["by_source"] = predicted_by_group(tuning, walks_by_group, verify_s, draft_s, plain_s)
    return tuning


def predicted_by_group(tuning: dict, walks_by_group: dict[str, list], verify_s: list[float], draft_s: float, plain_s: float) -> dict:
    """``{group: {"answers": n, "predicted_speedup": x}}``: the settings ``tuning`` chose, predicted on
    each group's walks alone (the same cost model as the choice)."""
    chosen = tuned_settings(tuning)
    report = {}
    for name, own in walks_by_group.items():
        if not own:
            predicted = None
        elif "prompt_lookup_confidence" in chosen:
            record = choose_threshold(own, verify_s, draft_s, thresholds=(chosen["confidence_threshold"],), plain_s=plain_s,
                                      lookup_confidences=(chosen["prompt_lookup_confidence"],), min_ngrams=(chosen["prompt_lookup_min_ngram"],),
                                      max_ngrams=(chosen["prompt_lookup_ngram"],) if "prompt_lookup_ngram" in chosen else None)
            predicted = record["hybrid"]["predicted"]
        else:
            predicted = choose_threshold(own, verify_s, draft_s, thresholds=(chosen["confidence_threshold"],), plain_s=plain_s)["predicted_speedup"][
                str(chosen["confidence_threshold"])]
        report[name] = {"answers": len(own), "predicted_speedup": predicted}
    return report


__all__ = [
    "LOOKUP_NGRAMS", "LookupTable", "choose_threshold", "cut_lengths", "leading_runs", "measure_consistency", "measure_costs", "predicted_by_group", "tune_threshold",
    "tuned_settings", "walk", "walk_costs",
]
