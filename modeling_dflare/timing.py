"""Forward-cost timing: how long a target's cached forward takes over 1..N new tokens.

The benchmark's cost curves and the training-time cost model (which chooses a draft's confidence
cut) both time the target this way, so they measure the same thing.
"""

import statistics

import torch


@torch.no_grad()
def measure_forward_costs(
    target, input_ids: torch.LongTensor, max_length: int, repeats: int, clock, cache=None, **forward_kwargs
) -> list[float]:
    """Median seconds of a cached target forward over 1..``max_length`` new tokens after ``input_ids``.

    ``forward_kwargs`` ride on every timed forward (e.g. the ``output_hidden_states`` request a
    DFlare generation makes), so the timing covers what generation asks of the target. ``cache``:
    a cache already holding ``input_ids`` (it is left as it was given); without one the prompt is
    run first.
    """
    from transformers import DynamicCache

    from .generation_dflare import cache_argument

    cache_name = cache_argument(target)  # `cache` where transformers deprecates `past_key_values`
    if cache is None:
        cache = DynamicCache(config=target.config)
        target(input_ids, **{cache_name: cache}, use_cache=True, **forward_kwargs)
    # Rounds over all lengths rather than all repeats of one length in a row: a slow spell of a
    # shared machine then lands on every length alike instead of bending the cost-per-token slope.
    times: list[list[float]] = [[] for _ in range(max_length)]
    for _ in range(repeats + 1):  # the first round is a warm-up
        for length in range(1, max_length + 1):
            new = input_ids[:, -1:].repeat(1, length)
            start = clock()
            target(new, **{cache_name: cache}, use_cache=True, **forward_kwargs)
            times[length - 1].append(clock() - start)
            cache.crop(-length)
    seconds = [statistics.median(per_length[1:]) for per_length in times]
    return seconds


__all__ = ["measure_forward_costs"]
