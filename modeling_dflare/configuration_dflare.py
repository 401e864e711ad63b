# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""Configuration of DFlare / DFlash block-diffusion draft models.

This file travels to the Hub with the draft (``trust_remote_code``): it imports only
``transformers`` and ``huggingface_hub``.
"""

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PreTrainedConfig

FUSION_MODES = ("layerwise", "shared")
DEFAULT_NUM_TARGET_LAYERS = {"layerwise": 9, "shared": 5}

#: Inclusive ``(lowest, highest)`` value of every size field, checked before anything is built from
#: them: a zero, a negative or an absurd size in a foreign or corrupted config.json then fails with
#: the field and value named, instead of a ZeroDivisionError or an attempt to allocate terabytes.
#: The highest values are far above any published model's (Llama 3.1 405B: hidden 16384,
#: intermediate 53248, 126 layers, 128 heads; Gemma 3: vocabulary 262144, head_dim 256).
SIZE_RANGES = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 1024),
    "num_target_hidden_layers": (1, 4096),
    "block_size": (2, 1024),
    "max_position_embeddings": (1, 1 << 30),
}


def size_problem(name: str, value) -> str | None:
    """Why ``value`` cannot be the size field ``name`` (a key of :data:`SIZE_RANGES`), or None."""
    low, high = SIZE_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"{name}={value!r}: expected an integer in [{low}, {high}]"
    return None


def spread_layer_ids(num_target_hidden_layers: int, count: int) -> list[int]:
    """``count`` target layer ids spread evenly from the second layer to the second-to-last one.

    The first and last layers are left out: the first is nearly the embedding and the last is
    specialised for the LM head, so intermediate layers carry the most useful context.
    """
    if count < 1:
        raise ValueError(f"number of target layers must be >= 1, got {count}")
    count = min(count, num_target_hidden_layers)
    start, end = (1, num_target_hidden_layers - 2) if num_target_hidden_layers > 3 else (0, num_target_hidden_layers - 1)
    if count == 1:
        return [(start + end) // 2]
    ids = [round(start + i * (end - start) / (count - 1)) for i in range(count)]
    return sorted(set(ids))


@strict
class DFlareConfig(PreTrainedConfig):
    r"""
    Configuration of a block-diffusion draft model (DFlare, or DFlash with ``fusion="shared"``).

    The draft owns only ``num_hidden_layers`` Qwen3-style transformer layers plus the fusion of the
    target's hidden states; it borrows the target's token embedding and LM head, so the geometry
    fields (``hidden_size``, ``vocab_size``, ...) must match the target it was built for.

    Args:
        num_hidden_layers (`int`): number of draft transformer layers (1 to 5 is typical).
        hidden_size (`int`): width of the draft, equal to the target's hidden size.
        intermediate_size (`int`): SwiGLU width of the draft MLP.
        num_attention_heads / num_key_value_heads / head_dim (`int`): draft attention geometry.
        vocab_size (`int`): the target's vocabulary size (the draft uses the target's LM head).
        target_layer_ids (`list[int]`): zero-based target layers whose outputs are the context
            (hidden_states index ``id + 1``), same meaning as transformers' DFlash.
        num_target_hidden_layers (`int`): depth of the target the draft was built for.
        block_size (`int`): positions per draft block: one anchor plus ``block_size - 1`` drafts.
        mask_token_id (`int`): token whose embedding fills the positions to be drafted.
        fusion (`str`): ``"layerwise"`` (DFlare: per-draft-layer softmax weights over the target
            layers and per-layer context K/V projections) or ``"shared"`` (DFlash: one
            ``fc(concat)`` vector shared by all draft layers).
        fusion_init_logit (`float`): initial logit of the target layer matched to each draft
            layer's relative depth (others start at 0), layer-wise fusion only.
        draft_vocab_size (`int`, *optional*): when set, the draft proposes only from this many
            frequent tokens (ids in the ``draft_vocab_ids`` buffer), which makes its LM head that
            much cheaper. Verification always uses the target's full vocabulary.
        confidence_threshold (`float`): a drafted block stops before the first position whose
            cumulative draft probability falls below this value (0 disables the cut). Fewer
            candidates make verification cheaper where the target is expensive (CPU).
        prompt_lookup_ngram (`int`): when > 0 and the confidence cut ends a block early, the
            positions after the cut take the continuation of the longest n-gram (n <= this value)
            that ends the sequence so far and occurred earlier in it (prompt lookup). Lossless like
            every proposal: the target verifies it. 0 disables the hybrid.
        prompt_lookup_min_ngram (`int`): the shortest n-gram match the hybrid accepts (a one-token
            match proposes noise: on the SmolLM2 held-out answers 14 % of such tokens were accepted,
            33 % with n >= 2).
        prompt_lookup_confidence (`float`): with the hybrid on, drafts whose cumulative confidence
            falls below this value (or below the confidence cut, if higher) give way to a lookup
            continuation when the context holds a match. ``dflare tune-cut`` chooses it.
        target_model_type / target_name_or_path (`str`): the target the draft was trained for,
            recorded to warn when it is used with another one.
        target_fingerprint (`list[float]`): a few input-embedding entries of the exact weights the
            draft was trained against (see ``modeling_dflare.target_fingerprint``). Names can agree
            while weights differ (a quantised copy renamed to its source's Hub id, a fine-tune); the
            fingerprint tells them apart, and a mismatch warns.
    """

    model_type = "dflare"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 2
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False

    target_layer_ids: list[int] | None = None
    num_target_hidden_layers: int = 30
    block_size: int = 16
    mask_token_id: int = 0
    fusion: str = "layerwise"
    fusion_init_logit: float = 2.0
    draft_vocab_size: int | None = None
    confidence_threshold: float = 0.0
    prompt_lookup_ngram: int = 0
    prompt_lookup_min_ngram: int = 2
    prompt_lookup_confidence: float = 0.3
    target_model_type: str | None = None
    target_name_or_path: str | None = None
    target_fingerprint: list[float] | None = None

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        try:  # before the defaults below are built from the sizes (a list of num_hidden_layers entries)
            self.validate_sizes()
        except ValueError as cause:
            raise DFlareConfigError(validator="validate_sizes", cause=cause) from cause
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.target_layer_ids is None:
            count = DEFAULT_NUM_TARGET_LAYERS.get(self.fusion, 9)
            self.target_layer_ids = spread_layer_ids(self.num_target_hidden_layers, count)
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    @property
    def num_target_layers(self) -> int:
        """How many target layers feed the context (T)."""
        return len(self.target_layer_ids)

    def validate_sizes(self):
        """Every size field must be an integer in its :data:`SIZE_RANGES` range (checked first: the
        other validators divide by head counts and compare ids with the vocabulary)."""
        for name in SIZE_RANGES:
            problem = size_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"DFlareConfig.{problem}")

    def validate_fusion(self):
        """`fusion` must name a known fusion mode and `fusion_init_logit` must be finite."""
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"DFlareConfig.fusion={self.fusion!r}: expected one of {FUSION_MODES}")
        if not abs(float(self.fusion_init_logit)) < float("inf"):
            raise ValueError(f"DFlareConfig.fusion_init_logit={self.fusion_init_logit!r}: expected a finite number")

    def validate_block(self):
        """`block_size` needs room for the anchor plus at least one draft; the mask token must be in the vocab."""
        if self.block_size < 2:
            raise ValueError(f"DFlareConfig.block_size={self.block_size}: expected >= 2 (anchor + at least one draft)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"DFlareConfig.mask_token_id={self.mask_token_id}: expected a token id in [0, vocab_size={self.vocab_size})"
            )
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(
                f"DFlareConfig.confidence_threshold={self.confidence_threshold}: expected a value in [0, 1)"
            )
        if not (isinstance(self.prompt_lookup_ngram, int) and 0 <= self.prompt_lookup_ngram <= 16):
            raise ValueError(
                f"DFlareConfig.prompt_lookup_ngram={self.prompt_lookup_ngram!r}: expected an integer in [0, 16] (0 = off)"
            )
        if not (isinstance(self.prompt_lookup_min_ngram, int) and 1 <= self.prompt_lookup_min_ngram <= 16):
            raise ValueError(
                f"DFlareConfig.prompt_lookup_min_ngram={self.prompt_lookup_min_ngram!r}: expected an integer in [1, 16]"
            )
        if not 0.0 <= self.prompt_lookup_confidence <= 1.0:
            raise ValueError(
                f"DFlareConfig.prompt_lookup_confidence={self.prompt_lookup_confidence!r}: expected a value in [0, 1]"
            )

    def validate_target_layers(self):
        """`target_layer_ids` must be non-empty, unique, and inside the target's depth."""
        ids = self.target_layer_ids
        if not ids:
            raise ValueError("DFlareConfig.target_layer_ids is empty: expected at least one target layer id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"DFlareConfig.target_layer_ids={ids}: expected unique layer ids")
        bad = [i for i in ids if not 0 <= i < self.num_target_hidden_layers]
        if bad:
            raise ValueError(
                f"DFlareConfig.target_layer_ids={ids}: ids {bad} are outside the target's "
                f"num_target_hidden_layers={self.num_target_hidden_layers} (expected 0..{self.num_target_hidden_layers - 1})"
            )

    def validate_geometry(self):
        """Heads must divide evenly and the optional draft vocabulary must fit in the vocab."""
        if self.num_hidden_layers < 1:
            raise ValueError(f"DFlareConfig.num_hidden_layers={self.num_hidden_layers}: expected >= 1 draft layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"DFlareConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"DFlareConfig.draft_vocab_size={self.draft_vocab_size}: expected None or 1..vocab_size={self.vocab_size}"
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As in transformers, but a config.json of another model type is an error, not a warning: a
        target's (or any other model's) folder would otherwise load as a DFlare draft with borrowed
        geometry and random weights."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a config with model_type={model_type!r}, expected "
                f"{cls.model_type!r}: this folder is not a DFlare draft (convert DFlash/DFlare checkpoints first)"
            )
        return config_dict, kwargs

    @classmethod
    def from_target_config(
        cls,
        target_config: PreTrainedConfig,
        num_hidden_layers: int = 2,
        fusion: str = "layerwise",
        num_target_layers: int | None = None,
        block_size: int = 16,
        mask_token_id: int | None = None,
        **kwargs,
    ) -> "DFlareConfig":
        """A draft config matching ``target_config``'s geometry, with target layers spread over depth.

        ``num_target_layers`` defaults to 9 for DFlare (``fusion="layerwise"``) and 5 for DFlash.
        ``mask_token_id`` defaults to the target's pad token, else its eos token (any token works:
        the draft learns its embedding as "unknown"; the embedding itself stays the target's).
        """
        text = target_config.get_text_config()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion={fusion!r}: expected one of {FUSION_MODES}")
        count = num_target_layers or DEFAULT_NUM_TARGET_LAYERS[fusion]
        if mask_token_id is None:
            mask_token_id = _first_token_id(text.pad_token_id, text.eos_token_id, default=0)
        rope = getattr(text, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope (Gemma3)
            rope = rope["full_attention"]
        values = dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            max_position_embeddings=getattr(text, "max_position_embeddings", 8192),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_parameters=dict(rope) if rope else None,
            target_layer_ids=spread_layer_ids(text.num_hidden_layers, count),
            num_target_hidden_layers=text.num_hidden_layers,
            block_size=block_size,
            mask_token_id=mask_token_id,
            fusion=fusion,
            target_model_type=text.model_type,
            target_name_or_path=getattr(target_config, "name_or_path", None) or None,
        )
        values.update(kwargs)
        return cls(**values)


class DFlareConfigError(StrictDataclassClassValidationError, ValueError):
    """An invalid DFlareConfig value. Both a ``ValueError`` (what the validators raise and the docs
    promise) and transformers' usual ``StrictDataclassClassValidationError``, so either ``except``
    catches it; the message names the field, the value and what was expected."""

    def __init__(self, validator: str, cause: Exception):
        super().__init__(validator=validator, cause=cause)
        self.validator = validator
        # the cause's own line (field, value, expected) is the message, so a command-line tool that
        # prints an error's first line shows it rather than the validator's name
        self.args = (f"{cause} (DFlareConfig.{validator})",)


_strict_validate = DFlareConfig.validate


def _validate(self) -> None:
    validators = type(self).__class_validators__
    # the sizes first: the other validators divide by them and compare ids with them
    for validator in sorted(validators, key=lambda validator: validator.__name__ != "validate_sizes"):
        try:
            validator(self)
        except ValueError as cause:
            raise DFlareConfigError(validator=validator.__name__, cause=cause) from cause
    _strict_validate(self)  # anything else (TypeError) as transformers reports it


# `@strict` runs `cls.validate` after __init__; the marker keeps subclasses decoratable with `@strict`.
_validate.__is_defined_by_strict_decorator__ = True
DFlareConfig.validate = _validate


def _first_token_id(*candidates, default: int) -> int:
    for value in candidates:
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return default


__all__ = ["SIZE_RANGES", "DFlareConfig", "DFlareConfigError", "size_problem", "spread_layer_ids"]
