"""A draft's starting point: a fresh draft shaped for the target (layers copied from the target at
matched depth, final norm at the target's scale, a draft vocabulary of frequent response tokens),
or a warm start from an earlier draft."""

import copy
import logging

import torch

from ..configuration_dflare import DFlareConfig
from ..modeling_dflare import DFlareModel, initial_fusion_logits
from .args import DEFAULT_BLOCK_SIZE, TrainArgs
from .sequences import Sequence, choose_draft_vocab

logger = logging.getLogger(__name__)


def build_draft(args: TrainArgs, target, sequences: list[Sequence], vocab_sequences: list[Sequence] | None = None) -> DFlareModel:
    """A fresh draft for ``target`` (or one warm-started from ``init_from``) with its draft vocabulary.

    ``vocab_sequences`` (``--draft-vocab-data``): answers to choose the vocabulary from, each prompt
    source weighed equally; a warm-started draft keeps its parent's vocabulary without them.
    """
    if args.init_from:
        draft = DFlareModel.from_pretrained(args.init_from, dtype=torch.float32)
        if draft.config.fusion != args.fusion:
            raise ValueError(f"--init-from {args.init_from} has fusion={draft.config.fusion!r}, but --fusion={args.fusion!r}")
        # The weights do not depend on the block size or the cut. Unless this run sets them, it
        # trains and measures with the parent's (a draft continued at another block size learns
        # positions it will not use, or misses ones it will), and the saved config carries them.
        if args.block_size is not None:
            draft.config.block_size = args.block_size
        if args.confidence_threshold is not None:
            draft.config.confidence_threshold = args.confidence_threshold
        logger.info("warm start from %s: block size %d, confidence cut %s%s", args.init_from, draft.config.block_size,
                    draft.config.confidence_threshold, "" if args.block_size is not None and args.confidence_threshold is not None
                    else " (the parent's unless given)")
        if vocab_sequences:
            rechoose_vocab(draft, target, vocab_sequences)
        return grow_draft(draft, target, args.grow_layers) if args.grow_layers else draft
    config = DFlareConfig.from_target_config(
        target.config,
        num_hidden_layers=args.num_hidden_layers,
        fusion=args.fusion,
        num_target_layers=args.num_target_layers,
        block_size=args.block_size if args.block_size is not None else DEFAULT_BLOCK_SIZE,
        draft_vocab_size=args.draft_vocab_size,
        confidence_threshold=args.confidence_threshold if args.confidence_threshold is not None else 0.0,
    )
    draft = DFlareModel(config)
    # Start the final norm at the target's own: the shared LM head then sees familiar scales
    # (a unit-scale norm gives initial losses of 30+ on real targets).
    target_norm = getattr(target.get_decoder(), "norm", None) if hasattr(target, "get_decoder") else None
    if target_norm is not None:
        with torch.no_grad():  # a row of ones has RMS 1: the output is the norm's effective scale, (1 + w) or w alike
            ones = torch.ones(1, config.hidden_size, device=target.device, dtype=target.dtype)
            draft.norm.weight.copy_(target_norm(ones)[0].float().cpu())
    if args.init_layers == "target":
        copy_target_layers(draft, target)
    if args.draft_vocab_size:
        vocab = choose_draft_vocab(
            vocab_sequences or sequences, args.draft_vocab_size, config.vocab_size, _always_kept(draft, target),
            balanced=bool(vocab_sequences),
        )
        draft.draft_vocab_ids.copy_(vocab)
    return draft


def _always_kept(draft: DFlareModel, target) -> list[int]:
    """Tokens every draft vocabulary holds, however rare: the mask token and the end-of-sequence token(s)."""
    eos = target.config.get_text_config().eos_token_id
    return [draft.config.mask_token_id] + ([eos] if isinstance(eos, int) else list(eos or []))


@torch.no_grad()
def rechoose_vocab(draft: DFlareModel, target, sequences: list[Sequence]) -> int:
    """Replace a warm-started draft's vocabulary (same size) by the one ``sequences`` choose, each prompt
    source weighed equally; returns how many ids changed. The draft's logits are products with the
    target's own output embeddings, so no weight belongs to an id: new ids need no new parameters."""
    if draft.draft_vocab_ids is None:
        raise ValueError("--draft-vocab-data: the --init-from draft scores the full vocabulary; there is no draft vocabulary to choose")
    old = draft.draft_vocab_ids.clone()
    vocab = choose_draft_vocab(sequences, old.numel(), draft.config.vocab_size, _always_kept(draft, target), balanced=True)
    draft.draft_vocab_ids.copy_(vocab)
    changed = old.numel() - int(torch.isin(vocab, old).sum())
    logger.info("draft vocabulary re-chosen from %d answers: %d of %d ids changed", len(sequences), changed, old.numel())
    return changed


def _effective_scale(norm: torch.nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel scale an RMS-style norm applies (``w`` or ``1 + w`` alike): its output on ones."""
    with torch.no_grad():
        return norm(torch.ones(1, width, device=like.device, dtype=like.dtype))[0].float().cpu()


@torch.no_grad()
def copy_target_layers(draft: DFlareModel, target) -> list[int]:
    """Start draft layer d as a copy of the target layer at the same relative depth.

    Each draft layer then begins as the target's own computation at that depth, reading (through
    layer-wise fusion, initialised near one-hot on that depth) the target hidden states that layer
    normally reads; context K/V projections start as the layer's own K/V projections. Shared fusion
    starts as the mean of the T target layers. Returns the copied target layer indices.
    """
    layers = list(target.get_decoder().layers)
    config, copied = draft.config, [_copy_target_layer(draft, index, layers) for index in range(len(draft.layers))]
    if config.fusion == "shared":
        eye = torch.eye(config.hidden_size) / config.num_target_layers
        draft.fc.weight.copy_(eye.repeat(1, config.num_target_layers))
    logger.info("draft layers initialised from target layers %s", copied)
    return copied


def _copy_target_layer(draft: DFlareModel, index: int, layers: list) -> int:
    """Copy into draft layer ``index`` the target layer at its relative depth; returns that layer's index."""
    config, layer = draft.config, draft.layers[index]
    copied = max(0, round((index + 1) / len(draft.layers) * len(layers)) - 1)
    attention, mlp = layers[copied].self_attn, layers[copied].mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(layer.self_attn, name).weight.copy_(getattr(attention, name).weight.float())
    if hasattr(layer.self_attn, "k_proj_target"):
        layer.self_attn.k_proj_target.weight.copy_(attention.k_proj.weight.float())
        layer.self_attn.v_proj_target.weight.copy_(attention.v_proj.weight.float())
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(layer.mlp, name).weight.copy_(getattr(mlp, name).weight.float())
    weight = attention.q_proj.weight
    layer.input_layernorm.weight.copy_(_effective_scale(layers[copied].input_layernorm, config.hidden_size, weight))
    layer.post_attention_layernorm.weight.copy_(_effective_scale(layers[copied].post_attention_layernorm, config.hidden_size, weight))
    return copied


@torch.no_grad()
def grow_draft(draft: DFlareModel, target, count: int) -> DFlareModel:
    """``draft`` with ``count`` more layers on top that start as the identity.

    Each new layer is the target layer at its relative depth (as a fresh draft's layers are) with
    its two residual branches' output projections (``o_proj``, ``down_proj``) zeroed, so the grown
    draft computes exactly what ``draft`` did and training starts from the trained draft's
    acceptance, with the new capacity opening up as those projections learn. Layer-wise fusion
    gives each new layer its own weights over the target layers, started near one-hot at its depth.
    """
    if count < 1:
        raise ValueError(f"grow by {count} layers: expected at least 1")
    old = draft.config.num_hidden_layers
    config = copy.deepcopy(draft.config)
    config.num_hidden_layers = old + count
    config.layer_types = [draft.config.layer_types[0]] * config.num_hidden_layers
    grown = DFlareModel(config).to(draft.dtype)
    state = dict(draft.state_dict())
    fusion = state.pop("layer_fusion_weights", None)
    missing, unexpected = grown.load_state_dict(state, strict=False)
    new_layers = tuple(f"layers.{i}." for i in range(old, config.num_hidden_layers))
    if unexpected or any(not (key.startswith(new_layers) or key == "layer_fusion_weights") for key in missing):
        raise ValueError(f"cannot grow the draft: unexpected {unexpected}, missing {missing}")
    if fusion is not None:
        grown.layer_fusion_weights.copy_(torch.cat([fusion, initial_fusion_logits(config)[old:].to(fusion)]))
    layers = list(target.get_decoder().layers)
    copied = []
    for index in range(old, config.num_hidden_layers):
        copied.append(_copy_target_layer(grown, index, layers))
        grown.layers[index].self_attn.o_proj.weight.zero_()
        grown.layers[index].mlp.down_proj.weight.zero_()
    logger.info("draft grown from %d to %d layers; new layers start as identities (from target layers %s)", old,
                config.num_hidden_layers, copied)
    return grown
