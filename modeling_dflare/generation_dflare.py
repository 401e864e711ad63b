# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""The generation side of a DFlare draft: ``target.generate(**inputs, assistant_model=draft)``.

* :func:`check_draft_matches_target`: refuses a draft that cannot serve the target, warns on one
  trained for other weights (an embedding fingerprint tells);
* :class:`DFlareCandidateGenerator`: one draft pass per cycle proposes a block, which transformers'
  assisted decoding verifies (greedy: longest matching prefix; sampling: rejection sampling); its
  ``generation_config.dflare_*`` knobs are read and checked by :func:`dflare_settings`;
* ``dflare_static_verify=True``: the fixed-shape, compiled verify loop of ``verify_dflare.py``
  instead of transformers' assisted decoding (for GPUs; the generator then proposes whole blocks);
* :func:`install_generate_hook`: routes DFlare drafts to that generator, after checking that the
  installed transformers still has the private signatures the hook wraps; a ``generate`` option
  assisted decoding cannot honour with a DFlare draft (beam search) is refused there, by name.

Travels to the Hub with ``modeling_dflare.py``; imports only torch, transformers and the two files
beside it (the CPU fast paths and the fixed-shape verify).
"""

import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import math
import numbers
import time
from typing import TYPE_CHECKING

import torch
from packaging.specifiers import SpecifierSet
from torch import nn
from transformers import DynamicCache, GenerationMixin
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.configuration_utils import GenerationMode

from .cpu_kernels_dflare import SMALL_ROW_KERNELS, draft_for_generation, draft_head, small_row_linears
from .verify_dflare import sample_token, static_verify_decoding, stop_free_length

if TYPE_CHECKING:
    from .modeling_dflare import DFlareModel

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Draft/target compatibility
# ----------------------------------------------------------------------------------------------


def check_draft_matches_target(draft: "DFlareModel", target: nn.Module) -> None:
    """Raise ``ValueError`` naming the value if ``draft`` cannot serve ``target``; warn on soft mismatches."""
    config, target_config = draft.config, target.config.get_text_config()
    unloaded = [name for name, tensor in itertools.chain(draft.named_parameters(), draft.named_buffers()) if tensor.device.type == "meta"]
    if unloaded:
        raise ValueError(
            f"DFlare draft has no weights: {unloaded[0]}{f' (and {len(unloaded) - 1} more)' if len(unloaded) > 1 else ''} is on "
            "the meta device, as left by "
            "init_empty_weights or an offloading device_map; load the draft onto a real device (any: its inputs are moved to it)"
        )
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
    recorded = getattr(config, "target_fingerprint", None)
    if recorded and fingerprints_match(recorded, target_fingerprint(target)):
        # The very weights the draft was trained against, whatever the checkpoint is called or
        # wherever it was loaded from (a local copy of a Hub model, an embedded GGUF): nothing to say.
        return
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
    elif recorded:
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


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes its KV cache without a deprecation warning:
    ``cache`` where transformers renamed it (and deprecates ``past_key_values``), else
    ``past_key_values``. Read from the forward's signature (a remote-code model may keep the old
    name), else from the library's output classes (a wrapper such as PEFT's takes ``**kwargs``)."""
    return _cache_argument(type(model))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError, AttributeError):
        parameters = {}
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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


#: How drafts are proposed under sampling (``generation_config.dflare_sampling_proposal``):
#: "sample" (default) draws each draft from the draft's own processed distribution q and hands q
#: to rejection sampling, which accepts it with probability 1 - TV(p, q); "argmax" proposes the
#: draft's most likely token as a one-hot distribution, accepted with probability p(x). Both are
#: exact. With the shipped SmolLM2 draft "sample" accepted more at temperature 0.7 and 1.0
#: (docs/results.md).
SAMPLING_PROPOSALS = ("sample", "argmax")


@dataclasses.dataclass(frozen=True)
class DFlareSettings:
    """The DFlare knobs of one ``generate`` call, read by :func:`dflare_settings`."""

    block_size: int
    confidence_threshold: float
    lookup_ngram: int
    lookup_min_ngram: int
    lookup_confidence: float
    #: None: the int8 CPU copy where it runs (see ``use_int8_draft``); True insists; False never
    int8_draft: bool | None
    #: a kernel name of SMALL_ROW_KERNELS, or False for the stock kernels
    small_row_kernels: str | bool
    sampling_proposal: str
    #: verify every cycle at the block's full, fixed shape on a static cache, compiled (verify_dflare.py)
    static_verify: bool = False


#: ``generation_config.dflare_<name>`` -> the draft config field that gives its default (None: a
#: fixed default). A ``dflare_*`` attribute not listed here is a typo and refused.
DFLARE_KNOBS = {
    "dflare_block_size": "block_size",
    "dflare_confidence_threshold": "confidence_threshold",
    "dflare_prompt_lookup_ngram": "prompt_lookup_ngram",
    "dflare_prompt_lookup_min_ngram": "prompt_lookup_min_ngram",
    "dflare_lookup_confidence": "prompt_lookup_confidence",
    "dflare_int8_draft": None,
    "dflare_small_row_kernels": None,
    "dflare_sampling_proposal": None,
    "dflare_static_verify": None,
}


def dflare_settings(generation_config, draft_config) -> DFlareSettings:
    """The DFlare settings of a ``generate`` call: each ``generation_config.dflare_*`` knob where it
    is set (not None), else the draft config's value. A knob of the wrong type or out of range, or
    an unknown ``dflare_*`` attribute, is a ``ValueError`` naming the field and the value."""
    unknown = sorted(k for k in vars(generation_config) if k.startswith("dflare_") and k not in DFLARE_KNOBS)
    if unknown:
        raise ValueError(
            f"generation_config.{unknown[0]}={getattr(generation_config, unknown[0])!r} is not a DFlare setting: "
            f"expected one of {', '.join(DFLARE_KNOBS)}"
        )

    def value(knob: str, default=None):
        setting = getattr(generation_config, knob, None)
        field = DFLARE_KNOBS[knob]
        return (getattr(draft_config, field) if field else default) if setting is None else setting

    def refuse(knob: str, expected: str):
        return ValueError(f"generation_config.{knob}={getattr(generation_config, knob)!r}: expected {expected}")

    def integer(knob: str, low: int, high: int | None = None) -> int:
        number = value(knob)
        if not isinstance(number, numbers.Integral) or isinstance(number, bool) or number < low or (high is not None and number > high):
            raise refuse(knob, f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}")
        return int(number)

    def fraction(knob: str) -> float:
        number = value(knob)
        if not isinstance(number, numbers.Real) or isinstance(number, bool) or not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise refuse(knob, "a number in [0, 1]")
        return float(number)

    block_size = integer("dflare_block_size", 2, int(draft_config.block_size))
    int8 = value("dflare_int8_draft")
    if int8 is not None and not isinstance(int8, bool):
        raise refuse("dflare_int8_draft", "None (automatic), True or False")
    kernels = value("dflare_small_row_kernels")
    if not (kernels is None or isinstance(kernels, bool) or (isinstance(kernels, str) and kernels in SMALL_ROW_KERNELS)):
        raise refuse("dflare_small_row_kernels", f"None, True, False or one of {SMALL_ROW_KERNELS}")
    proposal = value("dflare_sampling_proposal", SAMPLING_PROPOSALS[0])
    if not (isinstance(proposal, str) and proposal in SAMPLING_PROPOSALS):
        raise refuse("dflare_sampling_proposal", f"one of {SAMPLING_PROPOSALS}")
    static = value("dflare_static_verify", False)
    if not isinstance(static, bool):
        raise refuse("dflare_static_verify", "True or False")
    cut, lookup = fraction("dflare_confidence_threshold"), integer("dflare_prompt_lookup_ngram", 0)
    if static:
        # A fixed shape verifies the whole block: the draft config's cut and lookup give way; asking for them does not.
        for knob, setting in (("dflare_confidence_threshold", cut), ("dflare_prompt_lookup_ngram", lookup)):
            if getattr(generation_config, knob, None) not in (None, 0):
                raise ValueError(
                    f"generation_config.{knob}={setting!r} shortens blocks, but dflare_static_verify=True verifies every "
                    f"block whole: leave {knob} unset (or 0) with dflare_static_verify"
                )
        cut, lookup = 0.0, 0
    return DFlareSettings(
        block_size=block_size,
        confidence_threshold=cut,
        lookup_ngram=lookup,
        lookup_min_ngram=integer("dflare_prompt_lookup_min_ngram", 1),
        lookup_confidence=fraction("dflare_lookup_confidence"),
        int8_draft=int8,
        small_row_kernels="auto" if kernels in (None, True) else kernels,
        sampling_proposal=proposal,
        static_verify=static,
    )


def wants_all_hidden_states(generation_config) -> bool:
    """Whether the user asked ``generate`` for every layer's hidden states (``output_hidden_states``
    with ``return_dict_in_generate``): then the target computes them all anyway, and a generator
    that narrows the request to its own layers would hand the user tuples with holes."""
    return bool(getattr(generation_config, "output_hidden_states", False)) and bool(
        getattr(generation_config, "return_dict_in_generate", False)
    )


class DFlareCandidateGenerator(CandidateGenerator):
    """Drafts a block of candidates per cycle with a DFlare draft, for transformers' assisted decoding.

    The target is asked only for the hidden states of ``config.target_layer_ids``. Context K/V of
    accepted positions are computed once and cached; the block's own K/V are dropped right after
    each draft pass. Greedy: candidates are the draft's argmax. Sampling (see
    :data:`SAMPLING_PROPOSALS`): each draft is drawn from the draft's processed distribution and
    that distribution is returned as the candidate logits, or the argmax is returned with one-hot
    logits; transformers' rejection sampling is exact for either. The block's positions are
    marginals that do not see one another's samples, so later positions of a sampled block are
    accepted less often than the first; the first dominates the acceptance length.
    Statistics of the last call are in ``draft.dflare_stats``.
    """

    requires_model_outputs = True

    def __init__(self, assistant_model: "DFlareModel", target_model: nn.Module, generation_config, logits_processor=None):
        check_draft_matches_target(assistant_model, target_model)
        config = assistant_model.config
        self.draft = assistant_model
        self.target_layer_ids = list(config.target_layer_ids)
        # The target returns only the hidden states of the draft's layers, unless the user asked for
        # all of them: then all, and the draft takes its own from the user's.
        wanted = True if wants_all_hidden_states(generation_config) else hidden_state_request(self.target_layer_ids)
        self.model_kwargs_overrides = {"output_hidden_states": wanted}
        # each setting: the generation config's dflare_* knob where given, else the draft's config
        settings = dflare_settings(generation_config, config)
        self.block_size = settings.block_size
        #: every call proposes block_size - 1 candidates (the fixed-shape verify of verify_dflare.py)
        self.fixed_shape = settings.static_verify
        self.confidence_threshold = settings.confidence_threshold
        self.lookup_ngram = settings.lookup_ngram
        self.lookup_confidence = settings.lookup_confidence
        self.lookup_min_ngram = settings.lookup_min_ngram
        self.mask_token_id = config.mask_token_id
        self.max_length = generation_config.max_length
        self.do_sample = bool(generation_config.do_sample)
        self.sample_proposal = self.do_sample and settings.sampling_proposal == "sample"
        self.logits_processor = logits_processor if logits_processor else None
        self.input_embeddings = target_model.get_input_embeddings()
        head = target_model.get_output_embeddings().weight
        self.head_weight, self.head_ids = draft_head(assistant_model, head)
        # on a CPU an fp32 draft (or a bf16 one where bf16 is not native) runs as its int8 copy (see int8_draft)
        self.runner, self._head_product, precision = draft_for_generation(
            assistant_model, self.head_weight, settings.int8_draft
        )
        self.int8 = precision == "int8"
        self.vocab_size = head.shape[0]
        self.stopping_criteria = prefix_stopping_criteria(generation_config)
        self.cache = DynamicCache(config=config)
        self.num_context = 0
        self.stats = DFlareStats(draft_precision=precision)
        assistant_model.dflare_stats = self.stats
        self._last_proposed = self._last_drafted = 0
        self._proposal_scores: torch.Tensor | None = None  # [1, k, vocab] draft scores the drafts were sampled from
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
        """Candidate ids [1, k] from the draft hidden states [1, k, hidden]. With the sampled proposal,
        the processed draft scores of the drafted positions are left in ``_proposal_scores``."""
        self._proposal_scores = None
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
        if self.logits_processor is None and not self.sample_proposal:
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
        sequence, proposal = input_ids, []
        for i in range(full.shape[1]):
            scores = full[:, i] if self.logits_processor is None else self.logits_processor(sequence, full[:, i])
            if self.sample_proposal:
                # drawn from the draft's own processed distribution, which rejection sampling is then told
                token = sample_token(torch.softmax(scores.float(), dim=-1))
                proposal.append(scores.float())
            else:
                token = scores.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token.to(sequence.device)], dim=-1)
        if proposal:
            self._proposal_scores = torch.stack(proposal, dim=1)
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
        # A fixed-shape verify takes a whole block even at the end (drafts past max_length are dropped after it)
        budget = self.block_size - 1 if self.fixed_shape else min(self.block_size - 1, self.max_length - input_ids.shape[1] - 1)
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
        if not self.fixed_shape:  # the fixed-shape loop checks stops on the accepted tokens instead
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
            if self._proposal_scores is not None:
                # Sampled drafts: q is the distribution each was drawn from, so a draft is accepted with
                # min(1, p/q) and the residual is (p - q)+. Prompt-lookup tokens after them stay one-hot.
                sampled = min(self._last_drafted, candidates.shape[1])
                logits[:, :sampled] = self._proposal_scores[:, :sampled].to(logits.device)
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


def _in_supported_range(version: str) -> bool:
    """Whether ``version`` lies in :data:`SUPPORTED_TRANSFORMERS` (a dev or rc build counts as its release)."""
    return SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True).contains(version)


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


#: Generation config fields that turn ``generate`` into a search mode assisted decoding cannot run,
#: with their neutral values.
_SEARCH_OPTIONS = (("num_beams", 1), ("num_beam_groups", 1), ("penalty_alpha", 0), ("constraints", None), ("force_words_ids", None))


def check_generation_mode(generation_mode, generation_config) -> None:
    """Refuse, naming the options, a ``generate`` call whose settings select another mode than
    assisted decoding (beam search, group beam search, contrastive or constrained search):
    transformers would run that mode and ignore the draft with a log line."""
    if generation_mode == GenerationMode.ASSISTED_GENERATION:
        return
    mode = getattr(generation_mode, "value", generation_mode)
    options = [
        f"{name}={getattr(generation_config, name)!r}"
        for name, neutral in _SEARCH_OPTIONS
        if getattr(generation_config, name, None) not in (None, neutral)
    ]
    raise ValueError(
        f"DFlare speculative decoding runs greedy decoding or sampling only, not {mode}"
        + (f" ({', '.join(options)})" if options else "")
        + ": set num_beams=1 (with do_sample=True to sample), or generate without assistant_model"
    )


def _validate_generation_mode_hook(original):
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs, *args, **kwargs):
        assistant_model = generation_mode_kwargs.get("assistant_model")
        if is_dflare_draft(assistant_model):
            # Before transformers' own assistant checks: a vocab mismatch would otherwise read as a tokenizer problem.
            check_draft_matches_target(assistant_model, self)
            check_generation_mode(generation_mode, generation_config)
            dflare_settings(generation_config, assistant_model.config)  # a bad dflare_* knob fails before any forward
        return original(self, generation_mode, generation_config, generation_mode_kwargs, *args, **kwargs)

    return _validate_generation_mode


def _assisted_decoding_hook(original):
    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
        if not is_dflare_draft(kwargs.get("assistant_model")):
            return original(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        settings = dflare_settings(generation_config, kwargs["assistant_model"].config)
        if settings.static_verify:
            return _static_verify(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        # generation_config.dflare_small_row_kernels: "auto" (default), "packed", "matmul", or False
        # for the stock kernels (see small_row_linears)
        kernel = settings.small_row_kernels
        # The candidate generator is built without the stopping criteria; hand them over through this
        # call's private copy of the generation config (see ``stop_free_length``).
        generation_config._dflare_stopping_criteria = stopping_criteria
        kernels = small_row_linears(self, kernel) if kernel is not False else contextlib.nullcontext()
        try:
            with kernels:
                return original(self, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs)
        finally:
            generation_config.__dict__.pop("_dflare_stopping_criteria", None)

    return _assisted_decoding


#: ``_assisted_decoding`` keywords that are not model inputs
_GENERATION_MODE_KWARGS = ("synced_gpus", "streamer", "inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer")


def _static_verify(target, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
    """``dflare_static_verify=True``: the fixed-shape loop of verify_dflare.py instead of transformers'."""
    if args:
        raise TypeError(f"unexpected positional arguments to _assisted_decoding: {len(args)}")
    # built through _get_candidate_generator, as transformers' loop builds it (so whatever wraps that method sees it)
    generator = target._get_candidate_generator(
        generation_config=generation_config, input_ids=input_ids, inputs_tensor=kwargs.get("inputs_tensor"),
        assistant_model=kwargs["assistant_model"], logits_processor=logits_processor, target_tokenizer=kwargs.get("tokenizer"),
        assistant_tokenizer=kwargs.get("assistant_tokenizer"), model_kwargs=kwargs,
    )
    if not getattr(generator, "fixed_shape", False):
        raise ValueError(
            f"dflare_static_verify=True runs with the DFlare generator only, not {type(generator).__name__} "
            "(speculation_type, prompt_lookup_num_tokens and assistant_early_exit choose another one): leave those unset"
        )
    model_kwargs = {k: v for k, v in kwargs.items() if k not in _GENERATION_MODE_KWARGS}
    return static_verify_decoding(
        target, input_ids, logits_processor, stopping_criteria, generation_config, generator,
        streamer=kwargs.get("streamer"), cache_argument=cache_argument(target), **model_kwargs,
    )


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
        if wants_all_hidden_states(generation_config) and "output_hidden_states" in getattr(generator, "model_kwargs_overrides", {}):
            # The stock DFlash generator narrows the request to its layers: the user's tuples would have holes.
            generator.model_kwargs_overrides = {**generator.model_kwargs_overrides, "output_hidden_states": True}
        criteria = prefix_stopping_criteria(generation_config)
        if criteria and generation_config.speculation_type == "dflash":
            generator.get_candidates = _stop_aware(generator.get_candidates, criteria)
        return generator

    return _get_candidate_generator


__all__ = [
    "DFlareCandidateGenerator",
    "DFlareStats",
    "SUPPORTED_TRANSFORMERS",
    "cache_argument",
    "check_draft_matches_target",
    "check_generation_mode",
    "check_transformers_compatible",
    "dflare_settings",
    "install_generate_hook",
    "target_fingerprint",
]
