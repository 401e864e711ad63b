"""Tiny real components for tests, examples and the GPU check: the one home of every test helper.

Nothing here is a mock: the tokenizer is a real ``PreTrainedTokenizerFast`` with a chat template,
the targets are real transformers causal LMs with random weights, and the oracle draft runs the real
draft forward before steering its output.

* :func:`make_target` -- one builder for every architecture (``llama``, ``qwen3``, ``mistral``,
  ``gemma3``), tiny by default, any field overridable; :func:`tiny_target` is its preset for
  training tests (vocab 96, 4 layers, chat special tokens).
* :func:`tiny_tokenizer` -- word-level tokenizer with a chat template, any vocabulary size.
* :func:`make_draft`, :class:`OracleDraft` / :func:`make_oracle` -- random and acceptance-forcing drafts.
* :func:`greedy`, :func:`generation_kwargs`, :func:`random_prompt`, :class:`VerifyCounter`,
  :class:`StopOnToken`, :func:`path_kwargs` -- small helpers the generation tests share.
* :func:`exact_joint`, :func:`sample_continuations`, :func:`chi_square_pvalue` -- the sampling
  check: exact distribution of the first tokens by enumeration (tiny vocabulary), many sampled
  continuations, and a chi-square test of every pair of consecutive tokens against the exact joint.

The oracle draft exists because a randomly initialised draft accepts almost nothing, which would
leave the acceptance path (accepted blocks, eos inside a block, max length reached mid-block)
untested. It runs the real draft forward (so caches, masks and positions are exercised) and then
replaces the block's hidden states with the target's own final hidden states at the preceding
positions of a precomputed greedy reference, optionally corrupted at random, or wrong from a fixed
block position on (``accept_first``: every cycle then accepts exactly that many drafts). Through the
target's LM head these give the target's true next tokens, so blocks are accepted by either
generator (ours or the stock DFlash one).
"""

import copy
import itertools

import torch
from transformers import StoppingCriteria

from .configuration_dflare import DFlareConfig
from .modeling_dflare import DFlareModel

VOCAB = 100
ARCHITECTURES = ("llama", "qwen3", "mistral", "gemma3")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
TINY_WORDS = [f"w{i}" for i in range(88)]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _architectures() -> dict:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    return {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(num_hidden_layers=3, initializer_range=0.15)),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_hidden_layers=3, head_dim=8, initializer_range=0.15)),
        "mistral": (MistralConfig, MistralForCausalLM, dict(num_hidden_layers=2, sliding_window=64, initializer_range=0.2)),
        # Mixed sliding/full layers with a short window, so the target's sliding cache is cropped too.
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            dict(
                num_hidden_layers=4,
                head_dim=8,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                initializer_range=0.08,
            ),
        ),
    }


def target_config(arch: str, **overrides):
    """The tiny config of ``arch`` (vocab 100, hidden 32, 2 to 4 layers) with ``overrides`` applied."""
    table = _architectures()
    if arch not in table:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(table)}")
    config_class, _, extra = table[arch]
    values = {**_COMMON, **extra, **overrides}
    if arch == "gemma3" and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        values["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(values["num_hidden_layers"])]
    return config_class(**values)


def make_target(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM of architecture ``arch`` in eval mode (fp32), frozen, generating to
    ``max_new_tokens`` unless the overrides give it an eos token."""
    model_class = _architectures()[arch][1] if arch in _architectures() else None
    config = target_config(arch, **overrides)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def tiny_target(arch: str = "llama", vocab_size: int = 96, num_hidden_layers: int = 4, seed: int = 0, **overrides):
    """:func:`make_target` preset for chat data with :func:`tiny_tokenizer`: vocab 96, 4 layers,
    pad/eos/bos = 0/1/2, 512 positions."""
    values = dict(
        vocab_size=vocab_size,
        num_hidden_layers=num_hidden_layers,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.02,
    )
    if arch == "mistral":
        values.pop("head_dim")
    values.update(overrides)
    return make_target(arch, seed, **values)


def tiny_tokenizer(vocab_size: int = 96, words: list[str] | tuple[str, ...] = ()):
    """A word-level tokenizer of ``vocab_size`` tokens with a chat template: the specials
    (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, chat markers), then ``words``, then ``w0``, ``w1``, ...
    Unknown words become ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    filler = vocab_size - len(SPECIAL) - len(words)
    if filler < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small for {len(SPECIAL)} specials and {len(words)} words")
    vocab = {token: i for i, token in enumerate(SPECIAL + list(words) + [f"w{i}" for i in range(filler)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_draft(target, fusion: str = "layerwise", block_size: int = 4, seed: int = 1, cls=DFlareModel, **kwargs):
    """A randomly initialised draft of class ``cls`` built from ``target``'s config."""
    torch.manual_seed(seed)
    kwargs.setdefault("num_hidden_layers", 2)
    config = DFlareConfig.from_target_config(target.config, fusion=fusion, block_size=block_size, **kwargs)
    return cls(config).eval()


def generation_kwargs(**kwargs) -> dict:
    """``generate`` kwargs with any generation settings folded into a copy of ``generation_config``
    when one is given: transformers deprecates passing both."""
    config = kwargs.get("generation_config")
    if config is None:
        return kwargs
    config = copy.deepcopy(config)
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key != "generation_config" and hasattr(config, key)}
    config.update(**settings)
    return dict(kwargs, generation_config=config)


#: the architectures of :func:`make_target` whose layers all use full attention, so the fixed-shape
#: verify (``dflare_static_verify``) runs on them; a sliding-window layer's static cache cannot be rolled back
STATIC_ARCHITECTURES = ("llama", "qwen3")


def config_with(target, **settings):
    """A copy of ``target``'s generation config with ``settings`` set on it (DFlare knobs included,
    which ``GenerationConfig`` keeps as plain attributes)."""
    from transformers import GenerationConfig

    config = GenerationConfig(**target.generation_config.to_dict())
    for name, value in settings.items():
        setattr(config, name, value)
    return config


def static_config(target, compiled: bool = False, **knobs):
    """A copy of ``target``'s generation config with the fixed-shape verify on
    (``dflare_static_verify``); eager unless ``compiled`` (``torch.compile``: the path a GPU user
    runs, slow to compile on a CPU); ``knobs``: further generation-config attributes."""
    return config_with(target, dflare_static_verify=True, disable_compile=not compiled, **knobs)


def greedy(model, input_ids, **kwargs):
    """``model.generate`` with greedy decoding and no grad."""
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids, **generation_kwargs(**kwargs))


def random_prompt(length: int, seed: int = 0, vocab: int = VOCAB) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=generator)


def path_kwargs(path: str) -> dict:
    """``generate`` kwargs of a generator path: ``"custom"`` (ours) or ``"stock"`` (transformers' DFlash)."""
    return {"speculation_type": "dflash"} if path == "stock" else {}


class StopOnToken(StoppingCriteria):
    """Stops a row when its last token is ``token``."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class VerifyCounter:
    """Counts target forward passes (prefill + one per verify cycle) through a forward hook."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lm_head_inputs(target, sequence: torch.LongTensor, attention_mask=None) -> torch.Tensor:
    """The LM head's input at every position of ``sequence`` [1, n] -> [n, hidden]."""
    captured = []
    handle = target.get_output_embeddings().register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        with torch.no_grad():
            target(sequence, attention_mask=attention_mask, logits_to_keep=0)
    finally:
        handle.remove()
    return captured[0][0].detach()


class OracleDraft(DFlareModel):
    """A DFlare draft that knows the target's greedy continuation (see the module docstring).

    Set with :meth:`prime`. ``corruption`` is the probability that a block position gets a random
    hidden state instead of the true one (a likely rejection); ``accept_first`` (when set) makes block
    positions ``>= accept_first`` certainly wrong (the negated true state), so a cycle accepts
    exactly ``accept_first - 1`` drafts. ``position_offset`` converts the draft's position ids to
    indices of the reference sequence: our generator uses sequence indices, the stock DFlash one uses
    padding-aware positions (offset = number of left pads there).
    """

    int8_on_cpu = False  # its steering needs the exact head product (``dflare_int8_draft=True`` still forces it)
    table: torch.Tensor | None = None
    corruption: float = 0.0
    accept_first: int | None = None
    position_offset: int = 0
    rng: torch.Generator | None = None

    def prime(self, target, reference: torch.LongTensor, corruption: float = 0.0, seed: int = 0, attention_mask=None, position_offset: int = 0):
        """``reference`` [1, n]: prompt + the target's greedy continuation (longer than any run)."""
        if attention_mask is not None:
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(1, reference.shape[1] - attention_mask.shape[1])], dim=-1
            )
        self.table = lm_head_inputs(target, reference, attention_mask)
        self.corruption = corruption
        self.position_offset = position_offset
        self.rng = torch.Generator().manual_seed(seed)
        return self

    def forward(self, noise_embeds, context_hidden_states, position_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        out = super().forward(noise_embeds, context_hidden_states, position_ids, attention_mask, past_key_values, use_cache, **kwargs)
        if self.table is None:
            return out
        block = noise_embeds.shape[1]
        hidden = out.last_hidden_state.clone()
        table = self.table.to(hidden.device)
        if self.accept_first is not None:
            # vectorised (no host sync): what a GPU timing of the draft should see
            index = position_ids[0, -block:] + self.position_offset - 1
            inside = (index >= 0) & (index < table.shape[0])
            vectors = table[index.clamp(0, table.shape[0] - 1)]
            keep = inside & (torch.arange(block, device=hidden.device) < self.accept_first)
            steered = torch.where(keep[:, None], vectors, -vectors).to(hidden.dtype)
            hidden[0, 1:] = steered[1:]
            out.last_hidden_state = hidden
            return out
        positions = position_ids[0, -block:].tolist() if position_ids is not None else None
        for i in range(1, block):
            # The target's LM-head input at index p - 1 yields its greedy token at index p.
            index = positions[i] + self.position_offset - 1
            corrupt = torch.rand((), generator=self.rng).item() < self.corruption
            if corrupt or not 0 <= index < table.shape[0]:
                vector = torch.randn(table.shape[1], generator=self.rng).to(table.device) * table.std()
            else:
                vector = table[index]
            hidden[0, i] = vector.to(hidden.dtype)
        out.last_hidden_state = hidden  # the output keeps the draft's cache under whatever name transformers gives it
        return out


def make_oracle(
    target, prompt, fusion="layerwise", block_size=4, corruption=0.0, seed=0, extra_tokens=64, attention_mask=None, position_offset=0, cls=None, **kwargs
):
    """An :class:`OracleDraft` (or subclass ``cls``) primed with the target's greedy continuation of ``prompt``."""
    config = target.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        reference = greedy(target, prompt, attention_mask=attention_mask, max_new_tokens=extra_tokens, min_new_tokens=extra_tokens)
    finally:
        config.eos_token_id = saved
    draft = make_draft(target, fusion=fusion, block_size=block_size, cls=cls or OracleDraft, **kwargs)
    return draft.prime(target, reference, corruption, seed, attention_mask, position_offset), reference


# ----------------------------------------------------------------------------------------------
# Sampling: exact distributions and a chi-square test
# ----------------------------------------------------------------------------------------------

#: Vocabulary of the sampling targets (the exact joint enumerates SAMPLING_VOCAB ** NEW_TOKENS continuations).
SAMPLING_VOCAB = 8
#: Tokens sampled per continuation: with a block of 4 the first cycle proposes 2 drafts and can accept both.
NEW_TOKENS = 4


def exact_joint(target, prompt: torch.LongTensor, warpers, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """Exact probability of every ``new_tokens``-token continuation of ``prompt``, after the logits
    processors ``warpers`` (temperature, top-k, ...): a tensor of shape [V] * new_tokens."""
    vocab = target.get_output_embeddings().weight.shape[0]
    joint = torch.ones(())
    for step in range(new_tokens):
        prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=step)), dtype=torch.long).view(vocab**step, step)
        batch = torch.cat([prompt.expand(prefixes.shape[0], -1), prefixes], dim=-1)
        with torch.no_grad():
            logits = target(batch).logits[:, -1].float()
        probs = torch.softmax(warpers(batch, logits), dim=-1).view(*([vocab] * step), vocab)
        joint = joint.unsqueeze(-1) * probs
    return joint


def sample_continuations(target, prompt, n: int, seed: int, new_tokens: int = NEW_TOKENS, **kwargs) -> tuple[torch.LongTensor, int, int]:
    """``n`` sampled continuations [n, new_tokens] (one ``generate`` call each, as assisted decoding
    is single-sequence), and the drafts accepted and prompt-lookup tokens proposed by our generator
    over all calls (0 on the stock path, which keeps no ``dflare_stats``)."""
    torch.manual_seed(seed)
    rows, accepted, lookups = [], 0, 0
    draft = kwargs.get("assistant_model")
    with torch.no_grad():
        for _ in range(n):
            out = target.generate(prompt, **generation_kwargs(do_sample=True, max_new_tokens=new_tokens, **kwargs))
            rows.append(out[0, prompt.shape[1] :])
            if draft is not None and "speculation_type" not in kwargs:
                accepted += sum(draft.dflare_stats.accepted)
                lookups += draft.dflare_stats.lookup_tokens
    return torch.stack(rows), accepted, lookups


def chi_square_pvalue(samples: torch.LongTensor, joint: torch.Tensor) -> float:
    """Smallest chi-square p-value over every pair of consecutive tokens (t1, t2), (t2, t3), ... of
    ``samples`` [N, k] against the exact ``joint`` [V] * k. With a block of 4 and 4 new tokens, t2
    and t3 are the two *drafted* tokens of the first cycle (t1 comes from the prefill, t4 is the
    bonus), so (t2, t3) is the joint that rejection sampling must get right."""
    k = samples.shape[1]
    pvalues = []
    for i in range(k - 1):
        others = tuple(d for d in range(k) if d not in (i, i + 1))
        pair = joint.sum(dim=others) if others else joint
        pvalues.append(_chi_square(samples[:, i : i + 2], pair))
    return min(pvalues)


def _chi_square(samples: torch.LongTensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of joint samples [N, k] to ``probs`` [V] * k; rare cells are pooled."""
    n, vocab = samples.shape[0], probs.shape[0]
    flat = probs.flatten().double()
    index = torch.zeros(n, dtype=torch.long)
    for j in range(samples.shape[1]):
        index = index * vocab + samples[:, j]
    observed = torch.bincount(index, minlength=flat.numel()).double()
    expected = flat * n
    assert observed[expected == 0].sum() == 0, "a sample the exact distribution says is impossible"
    big = expected >= min_expected
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    statistic = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


__all__ = [
    "ARCHITECTURES",
    "NEW_TOKENS",
    "SAMPLING_VOCAB",
    "OracleDraft",
    "StopOnToken",
    "VOCAB",
    "VerifyCounter",
    "chi_square_pvalue",
    "config_with",
    "exact_joint",
    "generation_kwargs",
    "greedy",
    "lm_head_inputs",
    "make_draft",
    "make_oracle",
    "make_target",
    "path_kwargs",
    "random_prompt",
    "sample_continuations",
    "STATIC_ARCHITECTURES",
    "static_config",
    "target_config",
    "tiny_target",
    "tiny_tokenizer",
]
