# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""Fixed-shape verification: ``generate(assistant_model=draft)`` with ``dflare_static_verify=True``.

transformers' assisted decoding verifies ``1 + k`` tokens per cycle, where ``k`` changes from cycle
to cycle (a confidence cut, the tail of the length budget), on a cache that grows. On a GPU at
batch 1 every forward of that kind is launch-bound: a verify costs about 1.2 plain steps whatever it
computes. Serving engines get their numbers from static shapes replayed as CUDA graphs; this module
gives transformers users the same:

* every cycle verifies exactly ``block_size`` tokens (the last accepted token and ``block_size - 1``
  drafts: no confidence cut, no prompt lookup; drafts past the length budget are verified and
  dropped);
* on a :class:`~transformers.StaticCache` sized once for the whole call, rolled back after each
  verify by moving its write position (the rejected entries are overwritten next cycle and are never
  attended to before, since they lie after every query position);
* through a ``torch.compile``'d target forward (the ``compile_config`` of the generation config,
  transformers' default ``mode="reduce-overhead"`` being CUDA graphs on a GPU; ``disable_compile=True``
  keeps it eager), compiled once per shape and kept on the target between calls.

It is the same algorithm as the default path: greedy keeps the longest prefix of drafts that equals
the target's processed argmax plus the target's next token; sampling accepts a draft ``x`` drawn from
``q`` with probability ``min(1, p(x) / q(x))`` and resamples a rejection from ``(p - q)+``, which is
exact for any ``q`` the draft was really drawn from. Stop conditions are checked token by token on
the accepted tokens, as plain decoding checks them, so stop strings need no shorter blocks.

:func:`stop_free_length` (where in a run of tokens a stopping criterion first fires) lives here and
serves both paths. Travels to the Hub beside ``generation_dflare.py``; imports only torch and transformers.
"""

import torch
from torch import nn

#: ``generate`` options this loop does not produce, with their neutral values.
_UNSUPPORTED_OUTPUTS = (("output_attentions", False), ("output_hidden_states", False))
#: model kwargs ``generate`` prepares that this loop handles itself (anything else is an input the
#: fixed-shape verify cannot pass on, such as images).
_HANDLED_KWARGS = {"attention_mask", "cache", "past_key_values", "use_cache", "logits_to_keep", "position_ids", "cache_position",
                   "output_attentions", "output_hidden_states", "return_dict", "token_type_ids"}
#: cache lengths are rounded up to a multiple of this, so calls of nearby lengths reuse one cache and one graph
_CACHE_GRANULE = 256


def check_static_verify_supported(target: nn.Module, generation_config, model_kwargs: dict) -> None:
    """Refuse, naming the option, what the fixed-shape verify cannot run exactly."""
    for name, neutral in _UNSUPPORTED_OUTPUTS:
        if generation_config.return_dict_in_generate and getattr(generation_config, name, neutral) not in (None, neutral):
            raise ValueError(
                f"dflare_static_verify=True returns sequences, scores and logits, not {name}={getattr(generation_config, name)!r}: "
                "leave dflare_static_verify unset to get them"
            )
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _HANDLED_KWARGS and not k.startswith("dflare"))
    if extra:
        raise ValueError(
            f"dflare_static_verify=True verifies text-only inputs; got {', '.join(extra)}: leave dflare_static_verify unset for them"
        )
    token_types = model_kwargs.get("token_type_ids")
    if token_types is not None and bool(token_types.any()):
        raise ValueError("dflare_static_verify=True verifies text-only inputs with token_type_ids all 0")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "dflare_static_verify=True verifies unpadded prompts, but attention_mask has "
            f"{int((mask == 0).sum())} padding position(s): pass the prompt without padding"
        )
    config = target.config.get_text_config(decoder=True) if hasattr(target.config, "get_text_config") else target.config
    layer_types = getattr(config, "layer_types", None) or ()
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed or getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and not layer_types:
        raise ValueError(
            f"dflare_static_verify=True needs a target whose layers all use full attention; {config.model_type} has "
            f"{', '.join(windowed) or 'sliding-window attention'} layers, whose static cache cannot be rolled back: "
            "leave dflare_static_verify unset for this target"
        )


def static_cache_for(target: nn.Module, length: int):
    """A :class:`~transformers.StaticCache` of at least ``length`` positions for ``target``, emptied:
    the one kept on the target from an earlier call when it is long enough (same tensors, so the
    compiled verify is not traced again), else a new one, rounded up to :data:`_CACHE_GRANULE`."""
    from transformers import StaticCache

    weight = next(target.parameters())
    kept = getattr(target, "_dflare_static_cache", None)
    if kept is None or kept[0] != (weight.dtype, weight.device) or _capacity(kept[1]) < length:
        size = -(-length // _CACHE_GRANULE) * _CACHE_GRANULE
        kept = ((weight.dtype, weight.device), StaticCache(config=target.config, max_cache_len=size))
        target._dflare_static_cache = kept
    else:
        kept[1].reset()
    return kept[1]


def _capacity(cache) -> int:
    layer = cache.layers[0]
    return int(getattr(layer, "max_cache_len", 0))


def rewind(cache, tokens: int) -> None:
    """Drop the last ``tokens`` written positions of a static cache (their entries are overwritten
    by the next write, and no query attends to them before)."""
    if tokens <= 0:
        return
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise RuntimeError("a sliding-window static cache layer cannot be rolled back")
        layer.cumulative_length.sub_(tokens)


def verify_call(target: nn.Module, generation_config):
    """The target forward the verify runs: ``torch.compile``'d with the generation config's
    ``compile_config`` (``dynamic=False``: each shape its own graph, so a shape seen elsewhere never
    turns this one dynamic), kept on the target; eager with ``disable_compile=True``."""
    if getattr(generation_config, "disable_compile", False):
        return target.__call__
    from transformers import CompileConfig

    config = generation_config.compile_config or CompileConfig()
    options = {**config.to_dict(), "dynamic": False}
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    kept = getattr(target, "_dflare_verify_call", None)
    if kept is None or kept[0] != key:
        kept = (key, torch.compile(target.__call__, **options))
        target._dflare_verify_call = kept
    return kept[1]


def sample_token(probs: torch.Tensor) -> torch.LongTensor:
    """One draw from each row of ``probs`` (``[V]`` -> ``[1]``, ``[N, V]`` -> ``[N, 1]``), as
    ``torch.multinomial(probs, 1)`` draws it.

    On a CPU by the inverse of the cumulative distribution (one float64 uniform per row, the first
    index whose cumulative probability exceeds it, so a zero-probability token is never drawn): about
    0.16 ms for a 49k vocabulary where ``torch.multinomial`` takes about 1 ms (2-core Xeon, quiet),
    which a sampled proposal pays once per drafted token. Elsewhere, and for rows
    ``torch.multinomial`` would refuse (negative, non-finite or all-zero), ``torch.multinomial``
    itself, with its error.
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1)
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    if not bool(torch.isfinite(total).all()) or not bool((total > 0).all()) or bool((probs < 0).any()):
        return torch.multinomial(probs, 1)
    index = torch.searchsorted(cdf, torch.rand(total.shape, dtype=torch.float64) * total, right=True)
    past = index >= probs.shape[-1]  # u * total rounded up to total: the last token with any probability
    if bool(past.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1, keepdim=True)
        index = torch.where(past, last, index)
    return index


def _next_scores(logits_processor, sequence: torch.LongTensor, logits: torch.Tensor) -> torch.Tensor:
    scores = logits.float()
    return logits_processor(sequence, scores) if logits_processor else scores


def _accept(candidates, logits, q_logits, sequence, logits_processor, do_sample):
    """Verify ``candidates`` [1, k] against the target's ``logits`` [1, k + 1, V]: the accepted tokens
    [1, n + 1] (n leading drafts, then the target's own token) and their processed scores [n + 1, V]."""
    k = candidates.shape[1]
    if logits_processor:  # each position processed after the tokens before it, as plain decoding processes it
        scores = torch.cat([_next_scores(logits_processor, torch.cat([sequence, candidates[:, :j]], dim=-1), logits[:, j])
                            for j in range(k + 1)])  # [k + 1, V]
    else:
        scores = logits[0].float()
    if not do_sample:
        chosen = scores.argmax(-1)
        mismatch = (chosen[:k] != candidates[0]).nonzero()
        n = int(mismatch[0]) if mismatch.numel() else k
        return torch.cat([candidates[0, :n], chosen[n : n + 1]])[None], scores[: n + 1]
    p = torch.softmax(scores, dim=-1)
    q = torch.softmax(q_logits[0].float(), dim=-1)  # [k, V]
    index = candidates[0][:, None]
    ratio = p[:k].gather(-1, index)[:, 0] / q.gather(-1, index)[:, 0]
    rejected = (torch.rand(k, device=p.device) > ratio).nonzero()
    n = int(rejected[0]) if rejected.numel() else k
    if n < k:
        residual = (p[n] - q[n]).clamp_min(0)
        total = residual.sum()
        last = sample_token(residual / total if total > 0 else p[n])
    else:
        last = sample_token(p[k])
    return torch.cat([candidates[0, :n], last])[None], scores[: n + 1]


@torch.no_grad()
def stop_free_length(criteria: list, input_ids: torch.LongTensor, candidates: torch.LongTensor) -> int:
    """How many leading candidates can be proposed without any of them firing a stopping criterion.

    transformers' assisted decoding checks stopping criteria once per cycle, on the whole sequence
    after the accepted block is appended, so a stop string completed *inside* a block goes unseen
    and generation runs on past where plain ``generate`` stops. Proposing only the candidates
    before the first one that fires keeps the output identical: if the target agrees, it emits that
    token itself as the cycle's bonus token, which is last, and the cycle-end check stops there.
    """
    for j in range(candidates.shape[1] if criteria else 0):
        prefix = torch.cat([input_ids, candidates[:, : j + 1]], dim=-1)
        if any(bool(torch.as_tensor(c(prefix, None)).any()) for c in criteria):
            return j
    return candidates.shape[1]


def _first_stop(stopping_criteria, sequence, new_tokens) -> tuple[int, bool]:
    """``(m, stopped)``: plain decoding would emit the first ``m`` of ``new_tokens`` [1, n], and
    ``stopped`` says whether a stopping criterion ends it there (a stop string can end inside an
    accepted block; each prefix is checked, as plain decoding checks after every token)."""
    free = stop_free_length(list(stopping_criteria), sequence, new_tokens)
    return (free + 1, True) if free < new_tokens.shape[1] else (free, False)


@torch.no_grad()
def static_verify_decoding(
    target: nn.Module, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config, generator,
    streamer=None, cache_argument: str = "cache", **model_kwargs,
):
    """Speculative decoding with a fixed-shape verify (see the module docstring).

    ``generator`` is the draft's candidate generator (``fixed_shape=True``: always ``block_size - 1``
    candidates). Returns what ``generate`` returns: the sequences, or a ``GenerateDecoderOnlyOutput``
    with scores and logits when asked."""
    check_static_verify_supported(target, generation_config, model_kwargs)
    block = generator.block_size
    max_length = generation_config.max_length
    cache = static_cache_for(target, max_length + block)
    forward = verify_call(target, generation_config)
    hidden_request = generator.model_kwargs_overrides["output_hidden_states"]
    do_sample = bool(generation_config.do_sample)
    keep_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    keep_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores_out, logits_out = [], []

    # Prefill (eager: one shape per prompt length would be a graph each), then the first token.
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)[None]
    outputs = target(input_ids=input_ids, position_ids=positions, use_cache=True, output_hidden_states=hidden_request,
                     logits_to_keep=1, **{cache_argument: cache})
    raw = outputs.logits[:, -1].float()
    scores = _next_scores(logits_processor, input_ids, raw)
    token = sample_token(torch.softmax(scores, -1)) if do_sample else scores.argmax(-1, keepdim=True)
    new, kept_scores, kept_raw = token, scores, raw
    while True:
        emitted, stopped = _first_stop(stopping_criteria, input_ids, new)
        input_ids = torch.cat([input_ids, new[:, :emitted]], dim=-1)
        if streamer is not None:
            streamer.put(new[:, :emitted].cpu())
        if keep_scores:  # copies: a CUDA-graph replay overwrites its outputs
            scores_out.extend(kept_scores[i : i + 1].clone() for i in range(emitted))
        if keep_logits:
            logits_out.extend(kept_raw[i : i + 1].clone() for i in range(emitted))
        if stopped:
            break

        # Draft a full block, then verify [last token, drafts] at its fixed shape.
        candidate_ids, q_logits = generator.get_candidates(input_ids, model_kwargs={}, model_outputs=outputs)
        candidates = candidate_ids[:, input_ids.shape[1] :]
        start = input_ids.shape[1] - 1
        verify_ids = torch.cat([input_ids[:, -1:], candidates], dim=-1)
        positions = torch.arange(start, start + verify_ids.shape[1], device=input_ids.device)[None]
        outputs = forward(input_ids=verify_ids, position_ids=positions, use_cache=True, output_hidden_states=hidden_request,
                          logits_to_keep=0, **{cache_argument: cache})
        logits = outputs.logits.float()
        new, kept_scores = _accept(candidates, logits, q_logits, input_ids, logits_processor, do_sample)
        # drafts past max_length were verified only to keep the shape: dropped, as the default path drops them
        budget = max_length - input_ids.shape[1]
        new, kept_scores, kept_raw = new[:, :budget], kept_scores[:budget], logits[0, : min(new.shape[1], budget)]
        # the verify wrote [last token, drafts]; keep the entries of the last token and the drafts that stay
        rewind(cache, verify_ids.shape[1] - new.shape[1])
        generator.update_candidate_strategy(input_ids, None, new.shape[1] - 1)
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=tuple(scores_out) if keep_scores else None,
        logits=tuple(logits_out) if keep_logits else None,
    )


__all__ = ["check_static_verify_supported", "rewind", "static_cache_for", "static_verify_decoding", "stop_free_length", "verify_call"]
