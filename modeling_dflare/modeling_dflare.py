# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""DFlare / DFlash block-diffusion draft model and its `generate(assistant_model=...)` integration.

A draft fills a whole block ``[anchor, MASK, ..., MASK]`` in one forward pass. Its keys and values
come from two sources: the block's own tokens, and the target model's hidden states at every
accepted position ("KV injection"). Queries come only from the block, which attends to all the
context and bidirectionally to itself:

    keys ->      context (target hidden states)     block
               c0  c1  c2  c3  c4  c5  c6  c7    a  m  m  m
    query a     x   x   x   x   x   x   x   x    x  x  x  x
    query m     x   x   x   x   x   x   x   x    x  x  x  x     (x = attends)
    query m     x   x   x   x   x   x   x   x    x  x  x  x

What DFlare changes from DFlash (``fusion`` in the config):

* ``"shared"`` (DFlash): ``ctx = RMSNorm(fc(concat(h_t1 .. h_tT)))`` is one vector per position,
  projected to K/V by each layer's ``k_proj`` / ``v_proj`` (the same ones the block uses).
* ``"layerwise"`` (DFlare): draft layer ``d`` fuses the T target layers with its own softmax weights
  ``ctx_d = RMSNorm(sum_t softmax(w[d])_t * h_t)`` and projects them with its own
  ``k_proj_target`` / ``v_proj_target``, so shallow draft layers can read shallow target features.

The draft borrows the target's token embedding and LM head; neither is stored in the checkpoint.

This file travels to the Hub with the draft: it imports only torch, public transformers API and
``configuration_dflare``. Importing it installs a narrow hook so that
``target.generate(..., assistant_model=dflare_draft)`` uses :class:`DFlareCandidateGenerator`.
"""

import contextlib
import copy
import dataclasses
import functools
import logging
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dflare import DFlareConfig

logger = logging.getLogger(__name__)


class DFlareRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DFlareRotaryEmbedding(nn.Module):
    def __init__(self, config: DFlareConfig):
        super().__init__()
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            base = config.rope_parameters.get("rope_theta", 10000.0)
            dim = config.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, len, head_dim] by the last ``len`` positions of cos/sin [batch, n, head_dim]."""
    length = x.shape[-2]
    cos, sin = cos[:, None, -length:], sin[:, None, -length:]
    return x * cos + rotate_half(x) * sin


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DFlareAttention(nn.Module):
    """Qwen3-style attention (q/k RMSNorm) whose keys/values also cover the injected context."""

    def __init__(self, config: DFlareConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        bias = config.attention_bias
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=bias)
        self.q_norm = DFlareRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DFlareRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.fusion == "layerwise":
            self.k_proj_target = nn.Linear(config.hidden_size, kv_out, bias=bias)
            self.v_proj_target = nn.Linear(config.hidden_size, kv_out, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        batch, q_len = hidden_states.shape[:2]
        shape = (batch, -1, self.config.num_key_value_heads, self.head_dim)
        k_ctx_proj = getattr(self, "k_proj_target", self.k_proj)
        v_ctx_proj = getattr(self, "v_proj_target", self.v_proj)
        query = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)).transpose(1, 2)
        key = torch.cat([k_ctx_proj(context), self.k_proj(hidden_states)], dim=1).view(shape)
        value = torch.cat([v_ctx_proj(context), self.v_proj(hidden_states)], dim=1).view(shape)
        key = self.k_norm(key).transpose(1, 2)
        value = value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        output, _ = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(output.reshape(batch, q_len, -1))


class DFlareMLP(nn.Module):
    def __init__(self, config: DFlareConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DFlareDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DFlareConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DFlareAttention(config, layer_idx)
        self.mlp = DFlareMLP(config)
        self.input_layernorm = DFlareRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DFlareRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, context, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), context, position_embeddings, attention_mask, past_key_values
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DFlarePreTrainedModel(PreTrainedModel):
    config: DFlareConfig
    config_class = DFlareConfig
    base_model_prefix = ""
    main_input_name = "noise_embeds"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DFlareDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            # safetensors reports a truncated file as a header problem without naming the file.
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"the DFlare draft weights in {pretrained_model_name_or_path} cannot be read ({error}): the "
                "safetensors file is truncated or corrupted; download or save the draft again"
            ) from error

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DFlareRotaryEmbedding):
            # Non-persistent buffer: not in the checkpoint, so it must be rebuilt on every load.
            init.copy_(module.inv_freq, DFlareRotaryEmbedding(self.config).inv_freq)
        if isinstance(module, DFlareModel):
            if module.layer_fusion_weights is not None:
                init.copy_(module.layer_fusion_weights, initial_fusion_logits(self.config))
            if module.draft_vocab_ids is not None:
                init.copy_(module.draft_vocab_ids, torch.arange(module.draft_vocab_ids.numel()))


def initial_fusion_logits(config: DFlareConfig) -> torch.Tensor:
    """[num_draft_layers, T] logits: ``fusion_init_logit`` on the target layer whose relative depth
    matches each draft layer's, 0 elsewhere (a near one-hot starting mapping)."""
    depths = torch.tensor([(i + 1) / config.num_target_hidden_layers for i in config.target_layer_ids])
    logits = torch.zeros(config.num_hidden_layers, len(config.target_layer_ids))
    for layer in range(config.num_hidden_layers):
        matched = int(torch.argmin((depths - (layer + 1) / config.num_hidden_layers).abs()))
        logits[layer, matched] = config.fusion_init_logit
    return logits


class DFlareModel(DFlarePreTrainedModel):
    """Block-diffusion draft: ``num_hidden_layers`` non-causal Qwen3-style layers fed by fused target
    hidden states. Returns the final hidden states of the block; logits come from the target's LM
    head (see :meth:`draft_logits`)."""

    #: Whether ``generate`` may run this draft as its int8 CPU copy (:func:`int8_draft`) by default;
    #: a subclass whose proposals must follow exact fp32 logits (the test oracle) turns it off.
    int8_on_cpu: bool = True

    def __init__(self, config: DFlareConfig):
        super().__init__(config)
        hidden, count = config.hidden_size, config.num_target_layers
        self.layers = nn.ModuleList([DFlareDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.hidden_norm = DFlareRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = DFlareRMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = DFlareRotaryEmbedding(config)
        if config.fusion == "shared":
            self.fc = nn.Linear(count * hidden, hidden, bias=False)
            self.layer_fusion_weights = None
        else:
            self.layer_fusion_weights = nn.Parameter(torch.zeros(config.num_hidden_layers, count))
        if config.draft_vocab_size is not None:
            self.draft_vocab_ids = nn.Buffer(torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab_ids = None
        self.gradient_checkpointing = False
        self.post_init()

    def fuse_context(self, context_hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Per draft layer context vectors [batch, ctx, hidden] from [batch, ctx, T * hidden]."""
        if self.config.fusion == "shared":
            fused = self.hidden_norm(self.fc(context_hidden_states))
            return [fused] * len(self.layers)
        batch, length, _ = context_hidden_states.shape
        stacked = context_hidden_states.view(batch, length, self.config.num_target_layers, self.config.hidden_size)
        weights = torch.softmax(self.layer_fusion_weights.float(), dim=-1).to(stacked.dtype)
        fused = torch.einsum("bcth,dt->dbch", stacked, weights)
        return [self.hidden_norm(fused[d]) for d in range(len(self.layers))]

    def forward(
        self,
        noise_embeds: torch.Tensor,
        context_hidden_states: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        noise_embeds (`torch.Tensor` of shape `[batch, block, hidden]`):
            Target embeddings of the block tokens: the anchor then mask tokens (several blocks may be
            concatenated during training).
        context_hidden_states (`torch.Tensor` of shape `[batch, ctx, hidden * len(config.target_layer_ids)]`):
            Target hidden states of the new accepted positions, layers `config.target_layer_ids`
            concatenated on the last dim (hidden_states index `id + 1`).
        position_ids (`torch.LongTensor` of shape `[batch, ctx + block]`):
            Positions of the context tokens followed by those of the block tokens.
        attention_mask (`torch.Tensor` of shape `[batch, past + ctx + block]` or `[batch, 1, block, past + ctx + block]`):
            2D padding mask over all keys, or a boolean 4D mask (True = attend), e.g. the sparse
            training mask. None: every query sees every key.
        past_key_values (`Cache`, *optional*):
            Context K/V of earlier positions; the new context and block K/V are appended to it.
        """
        if past_key_values is None:
            # transformers >= 5.24's stock DFlash generator passes the cache as `cache=`
            past_key_values = kwargs.get("cache")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        ctx_len, block_len = context_hidden_states.shape[1], noise_embeds.shape[1]
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + ctx_len + block_len, device=noise_embeds.device)[None]
        attention_mask = self._expand_mask(attention_mask, block_len)
        # Compute in the draft's dtype, answer in the caller's: a bf16 draft then serves an fp32 target
        # whose LM head (stock DFlash generator) is applied to our output as is.
        output_dtype, dtype = noise_embeds.dtype, self.norm.weight.dtype
        noise_embeds = noise_embeds.to(dtype)
        contexts = self.fuse_context(context_hidden_states.to(dtype))
        position_embeddings = self.rotary_emb(noise_embeds, position_ids)
        hidden_states = noise_embeds
        for layer, context in zip(self.layers, contexts):
            hidden_states = layer(hidden_states, context, position_embeddings, attention_mask, past_key_values)
        last_hidden_state = self.norm(hidden_states).to(output_dtype)
        return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, past_key_values=past_key_values)

    @staticmethod
    def _expand_mask(attention_mask: torch.Tensor | None, block_len: int) -> torch.Tensor | None:
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask
        if bool(attention_mask.all()):
            return None  # nothing padded: the unmasked SDPA path is faster
        return attention_mask.bool()[:, None, None, :].expand(-1, 1, block_len, -1)

    def draft_logits(self, hidden_states: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (all tokens, or `draft_vocab_ids` when set)."""
        if self.draft_vocab_ids is not None:
            lm_head_weight = lm_head_weight[self.draft_vocab_ids.to(lm_head_weight.device)]
        return head_logits(hidden_states.to(lm_head_weight.dtype), lm_head_weight)


def bf16_is_native() -> bool:
    """Whether this machine's CPU runs bf16 matmuls natively (AVX512-BF16 / AMX on x86, BF16 on ARM).

    Read from the CPU's instruction sets (``torch.cpu.get_capabilities``), not from oneDNN's
    ``_is_mkldnn_bf16_supported``: oneDNN also says yes on a plain AVX-512 CPU, where it emulates
    bf16 and a SmolLM2 forward under bf16 autocast measured 3.6x *slower* than fp32 (Xeon with
    AVX512-BW but no AVX512-BF16, 1 thread: 124 vs 450 tokens/s over a 512-token prefill).

    CPU only: callers decide for CUDA devices themselves, so a CPU model on a machine that also has
    a GPU is not sent to bf16 on a CPU that would emulate it.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(name, False)) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    # Older torch (before get_capabilities): its private per-feature checks, x86 only.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def fast_draft_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a draft runs fastest in on ``device``: bf16 where it is native, else fp32.

    The draft only proposes, so its dtype never changes the output. On a 2-core AVX512-BF16 CPU the
    SmolLM2 draft's cycle costs about 10 ms in bf16 against 14 ms in fp32; a CPU without native
    bf16 would emulate it and run slower, hence fp32 there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and bf16_is_native() else torch.float32


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` for a few draft positions [..., hidden] and a large head [rows, hidden],
    in the form CPU kernels run fastest (measured on 7 positions x 16k rows, 2 threads):

    * as a 2-D product: a 3-D slice such as ``last_hidden_state[:, 1:]`` keeps the parent's batch
      stride, and with it bf16 falls off oneDNN onto a kernel about 8x slower (10.7 vs 1.4 ms);
    * fp32 on a CPU as ``(weight @ hidden.T).T`` (2.6 vs 9.4 ms), which spares MKL repacking the
      whole head for a handful of rows.

    Same values up to float rounding; the draft's logits only rank its own proposals.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.device.type == "cpu" and weight.dtype == torch.float32:
        logits = (weight @ flat.T).T
    else:
        logits = flat @ weight.T
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])


DFlareForBlockDiffusion = DFlareModel


# ----------------------------------------------------------------------------------------------
# Draft/target compatibility
# ----------------------------------------------------------------------------------------------


def check_draft_matches_target(draft: "DFlareModel", target: nn.Module) -> None:
    """Raise ``ValueError`` naming the value if ``draft`` cannot serve ``target``; warn on soft mismatches."""
    config, target_config = draft.config, target.config.get_text_config()
    head = target.get_output_embeddings()
    embed = target.get_input_embeddings()
    if head is None or embed is None:
        raise ValueError(f"target {type(target).__name__} has no input embedding or LM head: a causal LM is expected")
    problems = []
    if embed.weight.shape[-1] != config.hidden_size:
        problems.append(f"hidden size: draft {config.hidden_size}, target {embed.weight.shape[-1]}")
    if head.weight.shape[0] != config.vocab_size:
        problems.append(f"vocab size: draft {config.vocab_size}, target LM head {head.weight.shape[0]}")
    depth = target_config.num_hidden_layers
    beyond = [i for i in config.target_layer_ids if i >= depth]
    if beyond:
        problems.append(f"target_layer_ids {config.target_layer_ids} include {beyond}, past the target's {depth} layers")
    if problems:
        raise ValueError("DFlare draft does not match the target model: " + "; ".join(problems))
    if depth != config.num_target_hidden_layers:
        _warn_once(
            "DFlare draft was built for a target with %d layers, this target has %d: acceptance will suffer",
            config.num_target_hidden_layers,
            depth,
        )
    trained_for = _model_name(config.target_name_or_path)
    used_with = _model_name(getattr(target.config, "name_or_path", None))
    if config.target_model_type and config.target_model_type != target_config.model_type:
        _warn_once(
            "DFlare draft was trained for a %r target (%s) but is used with a %r one: acceptance will suffer",
            config.target_model_type,
            config.target_name_or_path,
            target_config.model_type,
        )
    elif trained_for and used_with and trained_for != used_with:
        # Same family, another checkpoint (a fine-tune, another size or version): drafts transfer badly.
        _warn_once(
            "DFlare draft was trained for target %r but is used with %r: acceptance may suffer",
            config.target_name_or_path,
            target.config.name_or_path,
        )
    elif getattr(config, "target_fingerprint", None) and not fingerprints_match(config.target_fingerprint, target_fingerprint(target)):
        # Same name, other weights: e.g. the draft was trained against a quantised copy (renamed to
        # its source's Hub id) and meets the original, or the other way round.
        _warn_once(
            "DFlare draft was trained against other weights of %r than this target's (their embedding "
            "fingerprints differ: a quantised copy, a fine-tune or another revision; the draft's card "
            "says which weights): output is unchanged, acceptance may suffer",
            config.target_name_or_path or target_config.model_type,
        )


#: How many embedding entries a fingerprint samples, and how far apart (in units of the embedding's
#: standard deviation) two may be and still count as the same weights: bf16 rounding of an fp32
#: checkpoint moves an entry by < 0.015 sd, 4-bit quantisation by about 0.1 sd on average.
FINGERPRINT_SIZE = 16
FINGERPRINT_TOLERANCE = 0.03


def target_fingerprint(target: nn.Module) -> list[float]:
    """``FINGERPRINT_SIZE`` input-embedding entries spread over the vocabulary, in units of the
    embedding's standard deviation: the same for the same weights in fp32 or bf16, different for a
    quantised copy or a fine-tune whatever the checkpoint is called."""
    weight = target.get_input_embeddings().weight.detach()
    vocab, hidden = weight.shape
    rows = [(vocab * (k + 1)) // (FINGERPRINT_SIZE + 1) for k in range(FINGERPRINT_SIZE)]
    cols = [(hidden * (2 * k + 1)) // (2 * FINGERPRINT_SIZE) for k in range(FINGERPRINT_SIZE)]
    sample = weight[rows].float()
    picked = sample[torch.arange(FINGERPRINT_SIZE, device=sample.device), torch.tensor(cols, device=sample.device)]
    values = (picked / sample.std().clamp_min(1e-12)).tolist()  # one host sync
    return [round(v, 5) for v in values]


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_TOLERANCE for x, y in zip(a, b))


_WARNED: set[str] = set()


def _warn_once(message: str, *args) -> None:
    """Log a soft-mismatch warning once per process, not on every generate call."""
    text = message % args
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning(text)


def _model_name(name_or_path) -> str | None:
    """Last component of a Hub id or local path (a local copy of a Hub model matches its id); None if unknown."""
    name = str(name_or_path or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    return name.lower() or None


def is_dflare_draft(model) -> bool:
    return model is not None and getattr(getattr(model, "config", None), "model_type", None) == "dflare"


# ----------------------------------------------------------------------------------------------
# Candidate generator
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DFlareStats:
    """Per-cycle record of one ``generate`` call: ``proposed[i]`` drafts were verified in cycle i and
    ``accepted[i]`` of them kept (the target adds one bonus token per cycle); the first
    ``drafted[i]`` of the proposed came from the draft, the rest from prompt lookup (the hybrid).
    ``lookup_tokens`` counts proposed tokens that came from prompt lookup rather than the draft."""

    proposed: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    drafted: list[int] = dataclasses.field(default_factory=list)
    host_draft_seconds: float = 0.0
    lookup_tokens: int = 0
    #: How the draft ran: "int8" (the dynamic-quantised CPU copy of :func:`int8_draft`) or its dtype.
    draft_precision: str = ""
    #: (start, end) CUDA events of each draft pass: read (and synchronised) only when asked for.
    cuda_events: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def draft_seconds(self) -> float:
        """Time spent drafting: host wall time on CPU; CUDA event time on a GPU (synchronises once, here)."""
        if not self.cuda_events:
            return self.host_draft_seconds
        self.cuda_events[-1][1].synchronize()
        return self.host_draft_seconds + sum(start.elapsed_time(end) for start, end in self.cuda_events) / 1000.0

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens gained per target verify forward (accepted drafts + 1 bonus)."""
        return (sum(self.accepted) + self.cycles) / self.cycles if self.cycles else 0.0

    def histogram(self, block_size: int) -> list[int]:
        """How many cycles accepted 0, 1, ..., block_size - 1 drafts."""
        counts = [0] * block_size
        for n in self.accepted:
            counts[min(n, block_size - 1)] += 1
        return counts


# Criteria that assisted decoding already enforces inside a block (length budget) or that need the
# scores of the step (assistant confidence); the others are checked on every drafted prefix. Eos is
# checked here too: transformers >= 5.18 crops an accepted block at its first eos, older versions
# keep the tokens after it (as padding), so proposing nothing past an eos is what keeps every
# supported version identical to plain ``generate``.
_CRITERIA_HANDLED_ELSEWHERE = ("MaxLengthCriteria", "ConfidenceCriteria")


def prefix_stopping_criteria(generation_config) -> list:
    """The user's stopping criteria (stop strings, custom ones) for this ``generate`` call, if any."""
    criteria = getattr(generation_config, "_dflare_stopping_criteria", None) or []
    return [c for c in criteria if type(c).__name__ not in _CRITERIA_HANDLED_ELSEWHERE]


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


def hidden_state_request(layer_ids: list[int]):
    """The ``output_hidden_states`` value that returns target layers ``layer_ids``: their
    ``hidden_states`` indices (``id + 1``) where transformers can keep only those (5.2x), else ``True``
    (all layers, e.g. transformers 5.17; same result, more memory)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return True
    if hasattr(output_capturing, "selected_hidden_states"):
        return [i + 1 for i in layer_ids]
    return True


def ngram_continuation(sequence: torch.LongTensor, max_ngram: int, count: int, min_ngram: int = 1) -> torch.LongTensor:
    """Up to ``count`` tokens that followed the most recent earlier occurrence of the longest n-gram
    (``max_ngram`` >= n >= ``min_ngram``) ending ``sequence`` (1-D). Empty when nothing matches."""
    length = sequence.numel()
    for n in range(min(max_ngram, length - 1), max(min_ngram, 1) - 1, -1):
        pattern = sequence[-n:]
        windows = sequence[:-1].unfold(0, n, 1)  # windows ending before the last token
        hits = (windows == pattern).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return sequence[start : start + count]
    return sequence[:0]


#: A lower-precision copy of the LM head rows is made for the draft only up to this size (bytes).
HEAD_COPY_LIMIT = 256 * 2**20


def draft_head(draft: "DFlareModel", head: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor | None]:
    """(LM head rows the draft proposes from, their token ids or None), cached on the draft per
    target head, so repeated ``generate`` calls do not gather the reduced-vocabulary rows again.

    The rows are kept in the draft's dtype when that is narrower than the head's and the copy is
    small (a bf16 draft next to an fp32 target): the draft's logits only rank its own proposals,
    the target verifies every one, and on a CPU the bf16 product runs about 9x faster (here 1.0 vs
    9.3 ms for 7 positions x 16k rows), which is half of the draft's time per cycle.
    """
    ids = draft.draft_vocab_ids
    dtype = draft.dtype if draft.dtype.itemsize < head.dtype.itemsize else head.dtype
    rows = head.shape[0] if ids is None else ids.numel()
    if rows * head.shape[1] * dtype.itemsize > HEAD_COPY_LIMIT:
        dtype = head.dtype
    if ids is None and dtype == head.dtype:
        return head.detach(), None
    key = (head.data_ptr(), head.device, head.dtype, tuple(head.shape), dtype, _version(head))
    key += (ids.data_ptr(), _version(ids)) if ids is not None else ()
    cached = getattr(draft, "_dflare_head_cache", None)
    if cached is None or cached[0] != key:
        weight = head.detach() if ids is None else head.detach()[ids.to(head.device)]
        cached = (key, weight.to(dtype), None if ids is None else ids.to(head.device))
        draft._dflare_head_cache = cached
    return cached[1], cached[2]


def int8_draft_supported(draft: nn.Module) -> bool:
    """Whether ``draft`` runs as an int8 copy (:func:`int8_draft`) by default: a draft in eval mode
    on a CPU, in fp32, or in bf16 where this CPU has no native bf16 (a bf16 draft on a CPU with
    AVX512-BF16 / AMX keeps its dtype); every linear layer an exact ``nn.Linear`` (not a LoRA or
    otherwise wrapped one); and a torch build with a quantised CPU engine."""
    engines = getattr(torch.backends.quantized, "supported_engines", [])
    return (
        draft.device.type == "cpu"
        and (draft.dtype == torch.float32 or (draft.dtype == torch.bfloat16 and not bf16_is_native()))
        and not draft.training
        and any(engine != "none" for engine in engines)
        and all(type(module) is nn.Linear for module in draft.modules() if isinstance(module, nn.Linear))
    )


def use_int8_draft(draft: nn.Module, setting: bool | None) -> bool:
    """``generation_config.dflare_int8_draft``: None (default) runs the int8 copy wherever
    :func:`int8_draft_supported`; True insists (a clear error where it cannot); False keeps the draft as is."""
    supported = int8_draft_supported(draft)
    if setting is None:
        return supported and getattr(draft, "int8_on_cpu", True)
    if setting and not supported:
        raise ValueError(
            f"dflare_int8_draft=True: the draft is a {draft.dtype} model on {draft.device} (training={draft.training}); "
            "the int8 copy needs a draft in eval mode on a CPU, in fp32 (or bf16 where the CPU has no native bf16), with plain nn.Linear layers"
        )
    return bool(setting)


def _version(tensor: torch.Tensor) -> int:
    """A tensor's in-place version counter; 0 for an inference tensor (made under
    ``torch.inference_mode``, which keeps no counter: such a tensor is not updated in place)."""
    try:
        return tensor._version
    except RuntimeError:
        return 0


def _quantize_dynamic(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation (per-output-channel weight scales) of ``module``'s ``nn.Linear`` layers, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that these APIs move to torchao (the kernels stay)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def int8_draft(draft: "DFlareModel") -> "DFlareModel":
    """An fp32 copy of ``draft`` whose linear layers run int8 kernels (weights quantised per output
    channel, activations per call), cached on the draft and rebuilt when its weights change.

    A draft's forward on a CPU is bound by reading its weights: SmolLM2's three-layer draft takes
    15 ms per block in fp32 on a 2-core AVX2 machine and 6.7 ms as int8, and its 16k-row head 6.4
    vs 1.0 ms (:func:`int8_head`). The draft only proposes; the target verifies every token, so the
    output of ``generate`` stays exactly the target's (acceptance moved from 2.08 to 2.03 on 12
    held-out prompts).
    """
    key = tuple((p.data_ptr(), _version(p)) for p in draft.parameters())
    cached = draft.__dict__.get("_dflare_int8")
    if cached is None or cached["key"] != key:
        # the copy leaves out what the draft caches for generation (stats, head rows, an older copy)
        memo = {id(draft.__dict__[name]): None for name in ("_dflare_int8", "_dflare_head_cache", "dflare_stats") if name in draft.__dict__}
        clone = _quantize_dynamic(copy.deepcopy(draft, memo).float().eval())
        cached = {"key": key, "model": clone, "head": None}
        draft.__dict__["_dflare_int8"] = cached
    return cached["model"]


def int8_head(draft: "DFlareModel", rows: torch.Tensor) -> nn.Module:
    """An int8 linear layer over the LM-head ``rows`` the draft proposes from (fp32 ``[rows, hidden]``),
    cached with :func:`int8_draft`'s copy; call it on ``[n, hidden]`` fp32 rows."""
    cached = draft.__dict__["_dflare_int8"]
    key = (rows.data_ptr(), _version(rows), tuple(rows.shape), rows.device)
    if cached["head"] is None or cached["head"][0] != key:
        linear = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        linear.weight = nn.Parameter(rows.detach().float(), requires_grad=False)
        cached["head"] = (key, _quantize_dynamic(nn.Sequential(linear))[0])
    return cached["head"][1]


def draft_for_generation(
    draft: "DFlareModel", head_rows: torch.Tensor, setting: bool | None = None
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    """How ``generate`` runs ``draft`` here: (the module to call, the head product for ``[..., k,
    hidden]`` draft states over ``head_rows``, the precision it runs in: "int8" or the draft's dtype).
    ``setting`` is ``generation_config.dflare_int8_draft`` (see :func:`use_int8_draft`)."""
    if not use_int8_draft(draft, setting):
        return draft, lambda hidden: head_logits(hidden, head_rows), str(draft.dtype).removeprefix("torch.")
    runner = int8_draft(draft)  # first: int8_head keeps its layer in this copy's cache entry
    head = int8_head(draft, head_rows)

    def logits(hidden: torch.Tensor) -> torch.Tensor:  # the int8 head takes the fp32 states as they are
        return head(hidden.reshape(-1, hidden.shape[-1]).float().contiguous()).reshape(*hidden.shape[:-1], -1)

    return runner, logits, "int8"


def _override(generation_config, key: str, default):
    """``generation_config.<key>`` where it is set (not None), else ``default``."""
    value = getattr(generation_config, key, None)
    return default if value is None else value


class DFlareCandidateGenerator(CandidateGenerator):
    """Drafts a block of candidates per cycle with a DFlare draft, for transformers' assisted decoding.

    The target is asked only for the hidden states of ``config.target_layer_ids``. Context K/V of
    accepted positions are computed once and cached; the block's own K/V are dropped right after
    each draft pass. Greedy: candidates are the draft's argmax. Sampling: the argmax proposal is
    returned with one-hot logits, so transformers' rejection sampling stays exactly lossless (a
    block-diffusion draft's positions are independent marginals: sampling them independently
    would give incoherent blocks). Statistics of the last call are in ``draft.dflare_stats``.
    """

    requires_model_outputs = True

    def __init__(self, assistant_model: "DFlareModel", target_model: nn.Module, generation_config, logits_processor=None):
        check_draft_matches_target(assistant_model, target_model)
        config = assistant_model.config
        self.draft = assistant_model
        self.target_layer_ids = list(config.target_layer_ids)
        self.model_kwargs_overrides = {"output_hidden_states": hidden_state_request(self.target_layer_ids)}
        self.block_size = int(getattr(generation_config, "dflare_block_size", None) or config.block_size)
        # each setting: the generation config's dflare_* override where given, else the draft's config
        self.confidence_threshold = float(_override(generation_config, "dflare_confidence_threshold", config.confidence_threshold))
        self.lookup_ngram = int(_override(generation_config, "dflare_prompt_lookup_ngram", config.prompt_lookup_ngram))
        self.lookup_confidence = float(_override(generation_config, "dflare_lookup_confidence", config.prompt_lookup_confidence))
        self.lookup_min_ngram = int(_override(generation_config, "dflare_prompt_lookup_min_ngram", config.prompt_lookup_min_ngram))
        self.mask_token_id = config.mask_token_id
        self.max_length = generation_config.max_length
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor if logits_processor else None
        self.input_embeddings = target_model.get_input_embeddings()
        head = target_model.get_output_embeddings().weight
        self.head_weight, self.head_ids = draft_head(assistant_model, head)
        # on a CPU an fp32 draft (or a bf16 one where bf16 is not native) runs as its int8 copy (see int8_draft)
        self.runner, self._head_product, precision = draft_for_generation(
            assistant_model, self.head_weight, getattr(generation_config, "dflare_int8_draft", None)
        )
        self.int8 = precision == "int8"
        self.vocab_size = head.shape[0]
        self.stopping_criteria = prefix_stopping_criteria(generation_config)
        self.cache = DynamicCache(config=config)
        self.num_context = 0
        self.stats = DFlareStats(draft_precision=precision)
        assistant_model.dflare_stats = self.stats
        self._last_proposed = self._last_drafted = 0
        self._prompt_unpadded: bool | None = None
        self.blocks = self.first_stops = 0  # drafted blocks and those the cut stopped at the first position

    def _embed(self, ids: torch.LongTensor) -> torch.Tensor:
        # Some targets normalise embeddings inside the module (`embed_norm`); the draft expects raw ones.
        embed_norm = getattr(self.input_embeddings, "embed_norm", None)
        if embed_norm is None:
            return self.input_embeddings(ids)
        try:
            self.input_embeddings.embed_norm = nn.Identity()
            return self.input_embeddings(ids)
        finally:
            self.input_embeddings.embed_norm = embed_norm

    @torch.no_grad()
    def _draft_hidden(self, input_ids, model_kwargs, model_outputs) -> torch.Tensor:
        """Ingest the new context and run the draft over ``[last token, MASK...]``; returns [1, block-1, hidden]."""
        cur_len = input_ids.shape[1]
        new = cur_len - 1 - self.num_context
        hidden = model_outputs.hidden_states
        if hidden is None or hidden[self.target_layer_ids[0] + 1] is None or hidden[self.target_layer_ids[0] + 1].shape[1] < new:
            raise RuntimeError("DFlare: the target did not return the hidden states of the accepted positions")
        device, dtype = self.runner.device, self.runner.dtype
        # each layer moves on its own: a target sharded with device_map returns them on several devices
        context = torch.cat([hidden[i + 1][:, :new].to(device, dtype) for i in self.target_layer_ids], dim=-1)
        block = torch.full((1, self.block_size), self.mask_token_id, dtype=torch.long, device=input_ids.device)
        block[:, 0] = input_ids[:, -1]
        noise = self._embed(block.to(self.input_embeddings.weight.device)).to(device, dtype)
        positions = torch.arange(self.num_context, cur_len - 1 + self.block_size, device=device)[None]
        mask = model_kwargs.get("attention_mask")
        if mask is not None and self._prompt_unpadded is None:
            # decided once per generate call (one host sync): later positions are never padding
            self._prompt_unpadded = bool(mask.all())
        if mask is not None and not self._prompt_unpadded:
            pad = torch.ones(1, self.block_size, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([mask[:, : cur_len - 1], pad], dim=-1).to(device)
        else:
            mask = None
        out = self.runner(
            noise_embeds=noise,
            context_hidden_states=context,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.num_context = cur_len - 1
        self.cache.crop(-self.block_size)  # keep only the context K/V
        return out.last_hidden_state[:, 1:]

    def _propose(self, input_ids: torch.LongTensor, hidden: torch.Tensor) -> torch.LongTensor:
        """Candidate ids [1, k] from the draft hidden states [1, k, hidden]."""
        if not self.int8:  # the int8 head takes the fp32 states as they are
            hidden = hidden.to(self.head_weight.device, self.head_weight.dtype)
        budget = hidden.shape[1]
        sure = None  # with the hybrid: how many leading drafts are confident enough to keep over a lookup
        if self.confidence_threshold > 0 or self.lookup_ngram > 0:
            self.blocks += 1
            if self._score_first_alone(hidden, budget):
                first = self._logits(hidden[:, :1])
                if torch.softmax(first.float(), dim=-1).amax() < self.confidence_threshold:
                    self.first_stops += 1
                    return self._lookup(input_ids, input_ids.new_zeros((1, 0)), budget, 0)
                logits = torch.cat([first, self._logits(hidden[:, 1:])], dim=1)
            else:
                logits = self._logits(hidden)
            confidence = torch.softmax(logits.float(), dim=-1).amax(-1).cumprod(-1)[0]
            if self.confidence_threshold > 0 and confidence[0] < self.confidence_threshold:
                self.first_stops += 1
            keep = int((confidence >= self.confidence_threshold).sum())
            if self.lookup_ngram > 0:
                sure = min(keep, int((confidence >= max(self.confidence_threshold, self.lookup_confidence)).sum()))
            logits = logits[:, :keep]
        else:
            logits = self._logits(hidden)
        if self.logits_processor is None:
            ids = logits.argmax(-1)
            ids = ids if self.head_ids is None else self.head_ids[ids]
            return self._lookup(input_ids, ids, budget, sure)
        if logits.shape[1] == 0:
            return self._lookup(input_ids, input_ids.new_zeros((1, 0)), budget, 0)
        full = logits.new_full((1, logits.shape[1], self.vocab_size), float("-inf"), dtype=torch.float32)
        if self.head_ids is None:
            full.copy_(logits.float())
        else:
            full[..., self.head_ids] = logits.float()
        sequence = input_ids
        for i in range(full.shape[1]):
            scores = self.logits_processor(sequence, full[:, i])
            sequence = torch.cat([sequence, scores.argmax(-1, keepdim=True).to(sequence.device)], dim=-1)
        return self._lookup(input_ids, sequence[:, input_ids.shape[1] :], budget, sure)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits over the proposal vocabulary for ``[1, k, hidden]`` draft states."""
        return self._head_product(hidden)

    def _score_first_alone(self, hidden: torch.Tensor, budget: int) -> bool:
        """Score the first drafted position before the rest? On a CPU the head product is bound by
        reading the head rows (a 16k x 576 bf16 head: about 4 ms for 1 row, 7 ms for 7), so a
        separate first pass saves where the cut usually stops a block at its first position (a weak
        draft, a high cut) and costs a second read of the head where it usually does not. Decided
        per block from this call's own record: while more than half of the blocks so far stopped
        at the first position."""
        if hidden.device.type != "cpu" or self.confidence_threshold <= 0 or budget <= 1:
            return False
        return 2 * self.first_stops > self.blocks - 1

    def _lookup(self, input_ids: torch.LongTensor, drafted: torch.LongTensor, budget: int, sure: int | None) -> torch.LongTensor:
        """Replace the unsure drafts (from ``sure`` on) with a prompt-lookup continuation, when the
        hybrid is on and the context holds an n-gram match; otherwise keep the drafts as they are."""
        self._last_drafted = drafted.shape[1]
        if self.lookup_ngram <= 0 or sure is None or budget - sure <= 0:
            return drafted
        kept = drafted[:, :sure]
        sequence = torch.cat([input_ids[0], kept[0].to(input_ids.device)])
        found = ngram_continuation(sequence, self.lookup_ngram, budget - sure, self.lookup_min_ngram)
        if found.numel() == 0:
            return drafted
        self.stats.lookup_tokens += found.numel()
        self._last_drafted = kept.shape[1]
        return torch.cat([kept, found[None].to(kept.device, kept.dtype)], dim=1)

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False, n_last_matches=0, **kwargs):
        """Return ``(input_ids + candidates, candidate_logits or None)``."""
        if is_first_iteration:
            return input_ids, None  # the target's prefill forward comes first
        budget = min(self.block_size - 1, self.max_length - input_ids.shape[1] - 1)
        self._last_proposed = self._last_drafted = 0
        if budget <= 0:
            return input_ids, None
        on_cuda = self.draft.device.type == "cuda"
        if on_cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        else:
            start = time.perf_counter()
        hidden = self._draft_hidden(input_ids, model_kwargs, model_outputs)[:, :budget]
        candidates = self._propose(input_ids, hidden).to(input_ids.device)
        candidates = candidates[:, : stop_free_length(self.stopping_criteria, input_ids, candidates)]
        if on_cuda:
            events[1].record()
            self.stats.cuda_events.append(events)
        else:
            self.stats.host_draft_seconds += time.perf_counter() - start
        self._last_proposed = candidates.shape[1]
        if candidates.shape[1] == 0:
            return input_ids, None
        logits = None
        if self.do_sample:
            # One-hot proposal: q(x) = 1 for the proposed token, so acceptance is p(x) and the residual is p without x.
            logits = torch.full((1, candidates.shape[1], self.vocab_size), float("-inf"), device=input_ids.device)
            logits.scatter_(-1, candidates[..., None], 0.0)
        return torch.cat([input_ids, candidates], dim=-1), logits

    def update_candidate_strategy(self, input_ids, scores, num_matches: int):
        if self._last_proposed or self.stats.cycles or self.num_context:
            self.stats.proposed.append(self._last_proposed)
            self.stats.accepted.append(int(num_matches))
            self.stats.drafted.append(min(self._last_drafted, self._last_proposed))


# ----------------------------------------------------------------------------------------------
# Dispatch: generate(assistant_model=dflare_draft) -> DFlareCandidateGenerator
# ----------------------------------------------------------------------------------------------


#: The transformers versions this file is tested against (oldest and newest, in CI). The oldest is
#: the first with the stock DFlash path (``speculation_type="dflash"``) the bench and ``convert``
#: compare against; setup.cfg's ``install_requires`` carries the same range (a test checks).
SUPPORTED_TRANSFORMERS = ">=5.15.0,<5.25"

#: The leading parameters each wrapped private method must still take, in order. The wrappers pass
#: these positionally or by name, so a transformers that renamed or reordered them would misroute
#: arguments silently; the hook refuses to install instead.
_HOOKED_SIGNATURES = {
    "_validate_generation_mode": ("self", "generation_mode", "generation_config", "generation_mode_kwargs"),
    "_assisted_decoding": ("self", "input_ids", "logits_processor", "stopping_criteria", "generation_config"),
    "_get_candidate_generator": ("self", "generation_config", "input_ids"),
}
_HOOKED_KEYWORDS = {"_get_candidate_generator": ("assistant_model", "logits_processor")}


def check_transformers_compatible(mixin: type = GenerationMixin) -> None:
    """Raise ``ImportError`` naming the supported range if ``mixin``'s private methods that the
    generate hook wraps no longer have the signatures it was written for."""
    import inspect

    import transformers

    problems = []
    for name, leading in _HOOKED_SIGNATURES.items():
        method = getattr(mixin, name, None)
        if method is None:
            problems.append(f"GenerationMixin.{name} is gone")
            continue
        method = inspect.unwrap(method)
        params = list(inspect.signature(method).parameters)
        if tuple(params[: len(leading)]) != leading:
            problems.append(f"GenerationMixin.{name}{tuple(params[: len(leading)])} (expected {leading})")
        missing = [k for k in _HOOKED_KEYWORDS.get(name, ()) if k not in params]
        if missing:
            problems.append(f"GenerationMixin.{name} takes no {', '.join(missing)}")
    if problems:
        raise ImportError(
            f"modeling_dflare's generate() hook does not fit transformers {transformers.__version__}: "
            + "; ".join(problems)
            + f". Supported: transformers{SUPPORTED_TRANSFORMERS} (pip install 'transformers{SUPPORTED_TRANSFORMERS}')"
        )


def _release(version: str) -> tuple[int, ...]:
    """(5, 24, 0) from "5.24.0", "5.24.0.dev0" or "5.24.0rc1" (this file imports nothing beyond torch
    and transformers, so no ``packaging``)."""
    parts = []
    for piece in version.split("."):
        digits = piece[: len(piece) - len(piece.lstrip("0123456789"))]  # leading digits only
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # "0rc1", "0dev": the release part ends here
            break
    return tuple(parts)


def _in_supported_range(version: str) -> bool:
    low, high = (_release(bound.strip().lstrip("<>=")) for bound in SUPPORTED_TRANSFORMERS.split(","))
    return low <= _release(version) < high


def _warn_if_untested_transformers() -> None:
    import transformers

    if not _in_supported_range(transformers.__version__):
        _warn_once(
            "transformers %s is outside the range modeling_dflare is tested with (%s); its hook signatures "
            "fit, so it is installed, but report anything odd",
            transformers.__version__,
            SUPPORTED_TRANSFORMERS,
        )


def install_generate_hook() -> None:
    """Make ``GenerationMixin._get_candidate_generator`` return a DFlare generator for DFlare drafts.

    Narrow: only assistants whose ``config.model_type == "dflare"`` are affected, and only when the
    stock DFlash path was not requested (``speculation_type="dflash"``) and no other candidate
    strategy (prompt lookup, early exit, MTP) was asked for. Idempotent: wrapping happens once per
    process, whichever copy of this module (installed package or ``trust_remote_code``) comes first;
    the generator class is taken from the draft's own module.

    For DFlare drafts on either path (ours or the stock DFlash one) two checks run first, so a user
    gets an error that names the problem instead of a shape error deep inside a forward:
    ``generate`` validation also checks the draft against the target (hidden size, vocab, layer
    ids), and a batch of more than one sequence is refused with what to do instead.

    Raises ``ImportError`` (naming :data:`SUPPORTED_TRANSFORMERS`) when the wrapped private methods
    changed signature, rather than patching them blind.
    """
    check_transformers_compatible()
    _warn_if_untested_transformers()
    _wrap_once("_validate_generation_mode", _validate_generation_mode_hook)
    _wrap_once("_assisted_decoding", _assisted_decoding_hook)
    _wrap_once("_get_candidate_generator", _get_candidate_generator_hook)


def _wrap_once(name: str, make_wrapper) -> None:
    original = getattr(GenerationMixin, name)
    if getattr(original, "_dflare_hook", False):
        return
    wrapper = make_wrapper(original)
    wrapper._dflare_hook = True
    wrapper.__wrapped__ = original
    setattr(GenerationMixin, name, wrapper)


def _validate_generation_mode_hook(original):
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs, *args, **kwargs):
        assistant_model = generation_mode_kwargs.get("assistant_model")
        if is_dflare_draft(assistant_model):
            # Before transformers' own assistant checks: a vocab mismatch would otherwise read as a tokenizer problem.
            check_draft_matches_target(assistant_model, self)
        return original(self, generation_mode, generation_config, generation_mode_kwargs, *args, **kwargs)

    return _validate_generation_mode


#: Linear calls over at most this many rows take the small-row CPU kernels of :func:`small_row_linears`.
SMALL_ROWS = 64
#: Weights with at least this many entries (a vocabulary-sized LM head) compute one row as two.
WIDE_WEIGHT = 1 << 22
#: Row count oneDNN lays a packed weight out for (any count 2..SMALL_ROWS then runs on it).
PACK_ROWS = 4
#: Kernel choices of :func:`small_row_linears` (``generation_config.dflare_small_row_kernels``).
SMALL_ROW_KERNELS = ("auto", "packed", "matmul")
#: Row counts ``"auto"`` times (a verify forward of a block of 8 runs 1-8 rows); counts between
#: two timed ones take the choice of the next timed count above, counts past the last its choice.
TIMED_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
#: A kernel replaces the stock one only when timed at least this much faster (a smaller gain is
#: within the timing's noise, and the stock kernel is what plain decoding runs).
MIN_GAIN = 0.05

# module -> ((data pointer, version, shape) of its weight, oneDNN-packed copy); entries go with the module
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
# model -> {(torch threads, layer signatures): {layer signature: kernel per row count 1..SMALL_ROWS}}
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed-weight linear (``mkldnn._linear_pointwise``) enabled."""
    return bool(
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_weight(module: nn.Linear) -> torch.Tensor:
    """oneDNN's packed (blocked) copy of ``module``'s fp32 CPU weight, cached per module and rebuilt
    when the weight changes (another tensor, or an in-place update)."""
    weight = module.weight
    key = (weight.data_ptr(), _version(weight), tuple(weight.shape))
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        _PACKED[module] = cached
    return cached[1]


def _onednn_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def _run_kernel(kernel: str, module: nn.Linear, flat: torch.Tensor) -> torch.Tensor:
    """``module`` applied to ``flat`` [rows, in] on one kernel: ``"stock"`` (``F.linear``),
    ``"packed"`` (oneDNN on :func:`packed_weight`), ``"matmul"`` (``W @ x.T``, which MKL runs
    without repacking W) or ``"tworow"`` (the rows twice through ``W @ x.T``: for one row a
    threaded GEMM instead of a single-threaded matrix-vector product)."""
    if kernel == "stock":
        return nn.functional.linear(flat, module.weight, module.bias)
    if kernel == "packed":
        return _onednn_linear(flat.contiguous(), packed_weight(module), module.bias)
    if kernel == "tworow":
        out = (module.weight @ torch.cat([flat, flat]).T).T[: flat.shape[0]]
    else:
        out = (module.weight @ flat.T).T
    return out + module.bias if module.bias is not None else out


def _through(kernel: str, module: nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``module`` applied to ``x`` (any leading shape, ``rows`` rows in all) on ``kernel``."""
    if kernel == "stock":
        return nn.functional.linear(x, module.weight, module.bias)
    out = _run_kernel(kernel, module, x.reshape(rows, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _small_rows_in(module: nn.Linear, x: torch.Tensor) -> int:
    """How many rows ``x`` feeds ``module`` when the small-row kernels apply to it, else 0."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return rows if 1 <= rows <= SMALL_ROWS and x.dtype == module.weight.dtype else 0


def _small_row_linear(module: nn.Linear, x: torch.Tensor, kernels: str = "packed") -> torch.Tensor:
    rows = _small_rows_in(module, x)
    if rows == 1:
        # One row runs as a single-threaded matrix-vector product; two rows run as a threaded GEMM,
        # which on a 2-core AVX2 EPYC computes SmolLM2's 49,152 x 576 head in 4.7 ms instead of 10 ms.
        wide = module.weight.numel() >= WIDE_WEIGHT and torch.get_num_threads() >= 2
        kernel = "tworow" if wide else "stock"
    elif rows:
        kernel = "packed" if kernels == "packed" and module.weight.is_contiguous() else "matmul"
    else:
        kernel = "stock"
    return _through(kernel, module, x, rows)


def _chosen_linear(module: nn.Linear, chosen: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    rows = _small_rows_in(module, x)
    return _through(chosen[rows - 1] if rows else "stock", module, x, rows)


def _signature(module: nn.Linear) -> tuple:
    """What a kernel's speed on ``module`` depends on: weight shape, bias, layout."""
    return (tuple(module.weight.shape), module.bias is not None, module.weight.is_contiguous())


@torch.no_grad()
def choose_small_row_kernels(
    modules: list[nn.Linear], rounds: int = 3, clock: Callable[[], float] = time.perf_counter
) -> dict[tuple, tuple[str, ...]]:
    """Time the candidate kernels of :func:`_run_kernel` on ``modules`` and pick the fastest for
    each kind of layer (:func:`_signature`) and each row count in ``TIMED_ROWS``.

    Each kind is timed over all its layers in a row, as a forward reads them, so that the weights
    stream from memory as they do in a real forward rather than sit in cache. The candidates take
    turns within a round and each keeps its median over ``rounds`` (after one warm-up round, which
    also packs the weights), so a slow spell of a shared machine lands on all of them alike. The
    stock kernel stays unless another is at least ``MIN_GAIN`` faster; packed copies of weights that
    no row count runs packed are freed. Returns ``{signature: (kernel for 1 row, ..., kernel for
    SMALL_ROWS rows)}``.
    """
    groups: dict[tuple, list[nn.Linear]] = {}
    for module in modules:
        groups.setdefault(_signature(module), []).append(module)
    packed = onednn_linear_available()
    chosen: dict[tuple, tuple[str, ...]] = {}
    for signature, group in groups.items():
        (_, features), _, contiguous = signature
        timed: dict[int, str] = {}
        for rows in TIMED_ROWS:
            candidates = ["stock", "matmul"] + (["packed"] if packed and contiguous else []) + (["tworow"] if rows == 1 else [])
            x = torch.randn(rows, features, dtype=group[0].weight.dtype, generator=torch.Generator().manual_seed(rows))
            seconds: dict[str, list[float]] = {kernel: [] for kernel in candidates}
            for round_ in range(rounds + 1):
                for kernel in candidates:
                    start = clock()
                    for module in group:
                        _run_kernel(kernel, module, x)
                    if round_:  # the first round warms up (and packs)
                        seconds[kernel].append(clock() - start)
            median = {kernel: statistics.median(times) for kernel, times in seconds.items()}
            fastest = min(candidates, key=median.__getitem__)
            timed[rows] = fastest if median[fastest] < (1 - MIN_GAIN) * median["stock"] else "stock"
        chosen[signature] = tuple(timed[next((t for t in TIMED_ROWS if t >= rows), TIMED_ROWS[-1])] for rows in range(1, SMALL_ROWS + 1))
    _free_packed(modules, [chosen])  # timing packed them: free the copies no row count will read
    return chosen


def _free_packed(modules: Iterable[nn.Module], choices: Iterable[dict]) -> int:
    """Drop the packed copies of ``modules`` that none of ``choices`` (``{signature: kernels per row
    count}``) runs packed; returns how many were dropped."""
    choices = list(choices)
    unused = [m for m in modules if m in _PACKED and not any("packed" in c.get(_signature(m), ()) for c in choices)]
    for module in unused:
        del _PACKED[module]
    return len(unused)


def free_unused_packed_weights(model: nn.Module) -> int:
    """Free the packed weight copies (:func:`packed_weight`) of ``model``'s layers that no ``"auto"``
    choice timed for it runs packed, e.g. after a fixed ``"packed"`` run packed every layer again.
    Returns how many copies were freed; a layer that needs one later packs it again."""
    return _free_packed(model.modules(), _CHOSEN.get(model, {}).values())


def _chosen_kernels(model: nn.Module, modules: list[nn.Linear]) -> dict[tuple, tuple[str, ...]]:
    """:func:`choose_small_row_kernels` for ``model``'s layers, timed once per model and thread count."""
    key = (torch.get_num_threads(), tuple(sorted({_signature(module) for module in modules})))
    per_model = _CHOSEN.setdefault(model, {})
    if key not in per_model:
        start = time.perf_counter()
        per_model[key] = choose_small_row_kernels(modules)
        changed = {
            "x".join(map(str, signature[0])): {rows: kernels[rows - 1] for rows in TIMED_ROWS if kernels[rows - 1] != "stock"}
            for signature, kernels in per_model[key].items()
        }
        logger.info(
            "small-row kernels timed in %.1f s at %d thread(s); other than stock: %s",
            time.perf_counter() - start,
            key[0],
            {shape: rows for shape, rows in changed.items() if rows} or "none",
        )
    return per_model[key]


@contextlib.contextmanager
def small_row_linears(model: nn.Module, kernels: str = "auto") -> Iterator[int]:
    """Run ``model``'s fp32 CPU ``nn.Linear`` layers on 1..``SMALL_ROWS`` rows on small-row kernels.

    A verify forward multiplies every weight matrix by a handful of rows (the block being checked).
    Stock ``x @ W.T`` hands MKL a layout it repacks the whole weight for, so on a 2-core CPU a
    SmolLM2-135M forward over 2 tokens costs 88 ms against 55 ms for one. Which kernel is fastest
    depends on the row count and on the machine. ``kernels``:

    - ``"auto"`` (default): for each kind of layer and row count, the fastest of the stock kernel,
      ``"packed"``, ``"matmul"`` and (one row) the row computed twice, timed on this model's own
      layers once per model and thread count (:func:`choose_small_row_kernels`: about 4 s for
      SmolLM2 on 2 cores, logged at INFO). Layers for which the stock kernel wins at every row count
      are left unswitched. On a 2-core AVX-512 Xeon without AVX512-BF16 it kept the stock kernel for
      every layer but the head, which runs packed from 4 rows: a SmolLM2 forward over 1 / 2 / 3 / 4 /
      6 / 8 tokens then cost 34 / 37 / 40 / 47 / 51 / 54 ms, against 33 / 37 / 39 / 51 / 54 / 61
      stock and 40 / 50 / 51 / 52 / 55 / 59 ``"packed"`` (2 threads, interleaved medians of 5).
    - ``"packed"``: oneDNN's linear on a copy of each weight packed once into its blocked layout
      (:func:`packed_weight`, cached with the module, rebuilt when the weight changes; it takes as
      much memory again as the weights: 509 MB for SmolLM2), from 2 rows. On a 2-core AVX2 EPYC a
      SmolLM2 forward over 2 / 3 / 4 / 6 / 9 tokens took 102 / 107 / 111 / 122 / 138 ms against
      109 / 134 / 112 / 149 / 177 ms as ``"matmul"`` (one token: 98 ms).
    - ``"matmul"``: ``W @ x.T`` from 2 rows: on a 2-core AVX512 EPYC a forward over 2-4 tokens cost
      about 45 ms and over 8 about 62 ms.

    With ``"packed"`` and ``"matmul"`` one row keeps the stock kernel, except for a vocabulary-sized
    head (``WIDE_WEIGHT`` entries), computed as two rows with 2+ threads. Values agree with the
    stock kernels to float rounding (about 1e-5 on the logits), the same class of difference as
    between the stock one-row and multi-row kernels that any assisted decoding already mixes.

    Only exact ``nn.Linear`` modules are switched (not subclasses such as quantised or LoRA layers,
    not modules that already carry their own ``forward``, e.g. accelerate offload hooks), through
    an instance attribute that is removed on exit. Yields how many layers were switched.
    """
    if kernels not in SMALL_ROW_KERNELS:
        raise ValueError(f"small-row kernels {kernels!r}: expected one of {SMALL_ROW_KERNELS}")
    if kernels == "packed" and not onednn_linear_available():
        kernels = "matmul"
    switched = [
        module
        for module in model.modules()
        if type(module) is nn.Linear
        and "forward" not in module.__dict__
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    ]
    if kernels == "auto" and switched:
        chosen = _chosen_kernels(model, switched)
        # a layer the stock kernel suits at every row count stays as it is (no wrapper to pay for)
        switched = [module for module in switched if set(chosen[_signature(module)]) != {"stock"}]
    for module in switched:
        if kernels == "auto":
            module.forward = functools.partial(_chosen_linear, module, chosen[_signature(module)])
        else:
            module.forward = functools.partial(_small_row_linear, module, kernels=kernels)
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)


def _assisted_decoding_hook(original):
    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
        if not is_dflare_draft(kwargs.get("assistant_model")):
            return original(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        # generation_config.dflare_small_row_kernels: None / True / "auto" (default), "packed", "matmul",
        # or False for the stock kernels (see small_row_linears)
        setting = getattr(generation_config, "dflare_small_row_kernels", None)
        if not (setting is None or isinstance(setting, bool) or setting in SMALL_ROW_KERNELS):
            raise ValueError(
                f"generation_config.dflare_small_row_kernels={setting!r}: expected None, True, False or one of {SMALL_ROW_KERNELS}"
            )
        # The candidate generator is built without the stopping criteria; hand them over through this
        # call's private copy of the generation config (see ``stop_free_length``).
        generation_config._dflare_stopping_criteria = stopping_criteria
        kernel = "auto" if setting in (None, True) else setting
        kernels = small_row_linears(self, kernel) if setting is not False else contextlib.nullcontext()
        try:
            with kernels:
                return original(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        finally:
            generation_config.__dict__.pop("_dflare_stopping_criteria", None)

    return _assisted_decoding


def _stop_aware(get_candidates, criteria):
    """Wrap a (stock) generator's ``get_candidates`` so that it proposes no candidate that fires a stop."""

    def wrapped(input_ids, *args, **kwargs):
        candidate_ids, logits = get_candidates(input_ids, *args, **kwargs)
        keep = stop_free_length(criteria, input_ids, candidate_ids[:, input_ids.shape[1] :])
        candidate_ids = candidate_ids[:, : input_ids.shape[1] + keep]
        return candidate_ids, (logits[:, :keep] if logits is not None and keep else None)

    return wrapped


def _get_candidate_generator_hook(original):
    def _get_candidate_generator(self, generation_config, *args, assistant_model=None, logits_processor=None, **kwargs):
        if not is_dflare_draft(assistant_model):
            return original(self, generation_config, *args, assistant_model=assistant_model, logits_processor=logits_processor, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[0] > 1:
            raise ValueError(
                f"DFlare speculative decoding runs one sequence at a time (transformers' assisted decoding is "
                f"single-sequence), got a batch of {input_ids.shape[0]}: call generate(assistant_model=draft) once per "
                "prompt, or generate the batch without assistant_model"
            )
        other_strategy = (
            generation_config.speculation_type == "dflash"
            or generation_config.prompt_lookup_num_tokens is not None
            or generation_config.assistant_early_exit is not None
            or getattr(generation_config, "use_mtp", False)
        )
        if not other_strategy:
            generator_class = getattr(type(assistant_model), "candidate_generator_class", DFlareCandidateGenerator)
            return generator_class(assistant_model, self, generation_config, logits_processor)
        generator = original(self, generation_config, *args, assistant_model=assistant_model, logits_processor=logits_processor, **kwargs)
        criteria = prefix_stopping_criteria(generation_config)
        if criteria and generation_config.speculation_type == "dflash":
            generator.get_candidates = _stop_aware(generator.get_candidates, criteria)
        return generator

    return _get_candidate_generator


DFlareModel.candidate_generator_class = DFlareCandidateGenerator
install_generate_hook()

__all__ = [
    "DFlareCandidateGenerator",
    "DFlareForBlockDiffusion",
    "DFlareModel",
    "DFlarePreTrainedModel",
    "DFlareStats",
    "SUPPORTED_TRANSFORMERS",
    "bf16_is_native",
    "check_draft_matches_target",
    "check_transformers_compatible",
    "choose_small_row_kernels",
    "draft_for_generation",
    "fast_draft_dtype",
    "install_generate_hook",
    "int8_draft",
    "int8_draft_supported",
    "onednn_linear_available",
    "packed_weight",
    "small_row_linears",
    "target_fingerprint",
]
