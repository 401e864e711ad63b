# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""DFlare / DFlash block-diffusion draft model.

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

This file and the two it imports travel to the Hub with the draft (they import only torch, public
transformers API and each other). Importing it installs a narrow hook, from
``generation_dflare``, so that ``target.generate(..., assistant_model=dflare_draft)`` drafts with
:class:`~generation_dflare.DFlareCandidateGenerator`; the CPU fast paths live in
``cpu_kernels_dflare``.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dflare import DFlareConfig
from .cpu_kernels_dflare import head_logits

#: The name of the cache in transformers' model outputs: ``cache`` where transformers renamed it
#: (and deprecates ``past_key_values``), ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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
        return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, **{CACHE_FIELD: past_key_values})

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


# The generation side imports nothing from this file at import time (annotations only), so it can be
# imported last: the draft then carries its generator class, and generate() knows DFlare drafts.
from .generation_dflare import DFlareCandidateGenerator, install_generate_hook  # noqa: E402

DFlareModel.candidate_generator_class = DFlareCandidateGenerator
install_generate_hook()

__all__ = ["DFlareModel", "DFlarePreTrainedModel", "initial_fusion_logits"]
