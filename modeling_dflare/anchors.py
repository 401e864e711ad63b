"""Anchor blocks for training: sampling, the sparse block mask, labels and loss weights.

A training sequence of length L holds a prompt and a response. ``A`` anchor positions are drawn
inside the response; anchor ``a`` opens the block ``[token[a], MASK x (B-1)]`` at positions
``a .. a+B-1`` whose labels are ``token[a+1 .. a+B-1]``. All blocks of a sequence go through the
draft in one pass. Keys are the L context positions (target hidden states) followed by the
``A * B`` block tokens; a block query sees context strictly before its anchor and every token of
its own block, nothing else:

    keys ->        context c0..c7            block 0 (a=3)   block 1 (a=5)
    block 0     x  x  x  .  .  .  .  .       x  x  x         .  .  .
    block 1     x  x  x  x  x  .  .  .       .  .  .         x  x  x
"""

import torch


def sample_anchors(
    response_start: int,
    length: int,
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Sorted anchor positions in ``[max(response_start - 1, 1), length - 2]``.

    The anchor itself may be the last prompt token (its block then drafts the first response
    tokens), and every anchor has at least one label inside the sequence. Anchor 0 is excluded: a
    block needs at least one context position.
    """
    low, high = max(response_start - 1, 1), length - 2
    if high < low:
        return torch.empty(0, dtype=torch.long)
    count = min(num_anchors, high - low + 1)
    choice = torch.randperm(high - low + 1, generator=generator)[:count] + low
    return choice.sort().values


def block_mask(anchors: torch.LongTensor, context_length: int, block_size: int) -> torch.BoolTensor:
    """Boolean mask [A*B, L + A*B] (True = attend), built with broadcasting (memory linear in A*B*(L+A*B))."""
    device = anchors.device
    num = anchors.numel()
    query_block = torch.arange(num * block_size, device=device) // block_size
    context_ok = torch.arange(context_length, device=device)[None, :] < anchors[query_block][:, None]
    key_block = torch.arange(num * block_size, device=device) // block_size
    block_ok = query_block[:, None] == key_block[None, :]
    return torch.cat([context_ok, block_ok], dim=1)


def block_inputs(
    input_ids: torch.LongTensor, anchors: torch.LongTensor, block_size: int, mask_token_id: int
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """(block token ids [A*B], block positions [A*B], labels [A*B] with -100 where there is none).

    Label at block position k is ``input_ids[a + k]`` for k >= 1; position 0 (the anchor) and
    positions past the end of the sequence carry -100.
    """
    length = input_ids.shape[-1]
    offsets = torch.arange(block_size, device=anchors.device)
    positions = (anchors[:, None] + offsets[None, :]).reshape(-1)
    tokens = torch.full_like(positions, mask_token_id)
    tokens[::block_size] = input_ids[anchors]
    inside = positions < length
    labels = torch.full_like(positions, -100)
    labels[inside] = input_ids[positions[inside]]
    labels[::block_size] = -100
    return tokens, positions, labels


def position_weights(block_size: int, gamma: float, device=None) -> torch.Tensor:
    """Loss weight per block position: 0 for the anchor, ``exp(-(k-1)/gamma)`` for k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32, device=device)
    weights = torch.exp(-(k - 1) / gamma)
    weights[0] = 0.0
    return weights


def expected_acceptance(correct: torch.BoolTensor) -> float:
    """Mean tokens per verify implied by per-block correctness [blocks, B-1]: 1 + leading correct run."""
    if correct.numel() == 0:
        return float("nan")
    leading = correct.long().cumprod(dim=1).sum(dim=1).float()
    return 1.0 + leading.mean().item()


def default_gamma(block_size: int) -> float:
    """gamma = 7 for B = 16 (the papers), scaled in proportion for other block sizes."""
    return 7.0 * block_size / 16


__all__ = ["block_inputs", "block_mask", "default_gamma", "expected_acceptance", "position_weights", "sample_anchors"]
