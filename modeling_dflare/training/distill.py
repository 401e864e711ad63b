"""The target's next-token distribution at training time, rebuilt from the cached features.

Distillation (``dflare train --distill ALPHA``) trains each block position on the target's whole
distribution over the draft vocabulary, not only on its greedy token. The feature cache holds the
draft's target layers, not the target's logits; :class:`TeacherHead` rebuilds them from the
deepest cached layer: it runs the target's remaining decoder layers over the sequence (one layer
for SmolLM2, whose draft reads layer 28 of 0-29), the final norm, and the head rows of the draft
vocabulary. That costs about one target layer per sequence plus one head product per labelled
block position, and needs no second feature pass over data that is already cached.

The last entry of ``output_hidden_states`` is the final norm's output (transformers ties it to
``last_hidden_state``), so when the draft reads the target's last layer the head applies directly.
"""

import torch
from torch.nn import functional as F

from .features import Features


class TeacherHead:
    """Target logits over the draft vocabulary at chosen positions of a sequence, from its features.

    ``target``: the frozen target (a Llama-style decoder: ``model.layers``, ``model.norm``,
    ``model.rotary_emb``); ``layer_ids``: the target layers in ``features.hidden``, in order;
    ``head_weight``: the head rows the draft is scored with (the draft vocabulary).
    """

    def __init__(self, target: torch.nn.Module, layer_ids: list[int], head_weight: torch.Tensor):
        inner = getattr(target, "model", None)
        missing = [name for name in ("layers", "norm", "rotary_emb") if not hasattr(inner, name)]
        if missing:
            raise ValueError(
                f"--distill needs a Llama-style target (target.model.layers / .norm / .rotary_emb); "
                f"{type(target).__name__} has no model.{missing[0]}"
            )
        count = len(inner.layers)
        self.last = max(layer_ids)
        if self.last >= count:
            raise ValueError(f"target layer {self.last} is past the target's {count} layers")
        self.count, self.position = len(layer_ids), list(layer_ids).index(self.last)
        self.layers = list(inner.layers)[self.last + 1 :]
        self.norm, self.rotary = inner.norm, inner.rotary_emb
        self.softcap = getattr(target.config, "final_logit_softcapping", None)
        self.head_weight = head_weight

    @torch.no_grad()
    def last_hidden(self, features: Features) -> torch.Tensor:
        """``[L, H]``: the target's final-norm output at every position of the sequence."""
        hidden = features.hidden[0]
        width = hidden.shape[-1] // self.count
        state = hidden[:, self.position * width : (self.position + 1) * width][None].to(self.head_weight.dtype)
        if not self.layers:  # the draft reads the last layer: its cached output is already normed
            return state[0]
        length = state.shape[1]
        position_ids = torch.arange(length, device=state.device)[None]
        # an explicit additive causal mask: eager and SDPA attention both read it the same way
        mask = torch.full((length, length), float("-inf"), device=state.device, dtype=state.dtype).triu(1)[None, None]
        try:
            embeddings = self.rotary(state, position_ids=position_ids)
            for layer in self.layers:
                out = layer(state, attention_mask=mask, position_embeddings=embeddings, position_ids=position_ids)
                state = out[0] if isinstance(out, tuple) else out
        except TypeError as error:  # e.g. Gemma 3: one rotary embedding per layer type
            raise ValueError(
                f"--distill cannot run the target's decoder layers {self.last + 1}-{self.last + len(self.layers)} the "
                f"Llama way ({error}); train without --distill, or with target layers up to its last"
            ) from error
        return self.norm(state)[0]

    @torch.no_grad()
    def logits(self, features: Features, rows: torch.LongTensor) -> torch.Tensor:
        """``[len(rows), V_draft]``: the target's logits for the token after each position in ``rows``."""
        logits = self.last_hidden(features)[rows] @ self.head_weight.T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def agreement(self, features: Features, token_to_draft: torch.LongTensor | None = None) -> float:
        """Share of positions where the rebuilt logits' argmax is the target's cached greedy token
        (among those the draft vocabulary holds): about 1 when the rebuild is right (the cached
        features are bf16, so a near-tie may flip), far lower for an architecture it gets wrong."""
        labels = features.predictions.reshape(-1)
        guess = self.logits(features, torch.arange(labels.numel(), device=labels.device)).argmax(-1)
        if token_to_draft is not None:
            labels = token_to_draft[labels]
        keep = labels >= 0
        return (guess[keep] == labels[keep]).float().mean().item() if keep.any() else float("nan")


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the draft's ``logits`` against the target's distribution (fp32)."""
    return -(F.softmax(teacher_logits.float(), dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(-1)
