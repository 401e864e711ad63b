"""Shared fixtures: tiny random targets of several architectures, drafts, and an oracle draft.

Tiny means vocab ~100, hidden 32, 2 to 4 layers: every test here must run on 2 busy CPU cores.
The real SmolLM2 target is loaded once per session, only by tests that ask for ``smollm2``.

The oracle draft (:class:`OracleDraft`) exists because a randomly initialised draft accepts almost
nothing, which would leave the acceptance path (accepted blocks, eos inside a block, max length
reached mid-block) untested. It runs the real draft forward (so caches, masks and positions are
exercised) and then replaces the block's hidden states with the target's own final hidden states
at the preceding positions of a precomputed greedy reference, optionally corrupted at random.
Through the target's LM head these give the target's true next tokens, so blocks are accepted
by the target, by either generator (ours or the stock DFlash one).
"""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
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
from transformers.modeling_outputs import BaseModelOutputWithPast

import modeling_dflare  # noqa: F401  (registers the generate() hook)
from modeling_dflare import DFlareCandidateGenerator, DFlareConfig, DFlareModel

torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

VOCAB = 100
ARCHITECTURES = ("llama", "qwen3", "mistral", "gemma3")

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
_ARCH = {
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
    config_class, _, extra = _ARCH[arch]
    return config_class(**{**_COMMON, **extra, **overrides})


def make_target(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM of architecture ``arch`` in eval mode (fp32, SDPA)."""
    _, model_class, _ = _ARCH[arch]
    torch.manual_seed(seed)
    model = model_class(target_config(arch, **overrides)).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = None
    return model


@functools.lru_cache(maxsize=None)
def cached_target(arch: str, seed: int = 0):
    """Shared tiny target; callers must not modify it (copy the generation config per call instead)."""
    return make_target(arch, seed)


def make_draft(target, fusion: str = "layerwise", block_size: int = 4, seed: int = 1, cls=DFlareModel, **kwargs):
    """A randomly initialised draft of class ``cls`` built from ``target``'s config."""
    torch.manual_seed(seed)
    kwargs.setdefault("num_hidden_layers", 2)
    config = DFlareConfig.from_target_config(target.config, fusion=fusion, block_size=block_size, **kwargs)
    return cls(config).eval()


def greedy(model, input_ids, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids, **kwargs)


def random_prompt(length: int, seed: int = 0, vocab: int = VOCAB) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=generator)


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


# ----------------------------------------------------------------------------------------------
# Oracle draft
# ----------------------------------------------------------------------------------------------


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
    hidden state instead of the true one (a likely rejection). ``position_offset`` converts the
    draft's position ids to indices of the reference sequence: our generator uses sequence indices,
    the stock DFlash one uses padding-aware positions (offset = number of left pads there).
    """

    table: torch.Tensor | None = None
    corruption: float = 0.0
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
        positions = position_ids[0, -block:].tolist() if position_ids is not None else None
        hidden = out.last_hidden_state.clone()
        for i in range(1, block):
            # The target's LM-head input at index p - 1 yields its greedy token at index p.
            index = positions[i] + self.position_offset - 1
            corrupt = torch.rand((), generator=self.rng).item() < self.corruption
            if corrupt or not 0 <= index < self.table.shape[0]:
                vector = torch.randn(self.table.shape[1], generator=self.rng) * self.table.std()
            else:
                vector = self.table[index]
            hidden[0, i] = vector.to(hidden.dtype)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=out.past_key_values)


def make_oracle(target, prompt, fusion="layerwise", block_size=4, corruption=0.0, seed=0, extra_tokens=64, attention_mask=None, position_offset=0, **kwargs):
    """An :class:`OracleDraft` primed with the target's greedy continuation of ``prompt``."""
    config = target.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        reference = greedy(target, prompt, attention_mask=attention_mask, max_new_tokens=extra_tokens, min_new_tokens=extra_tokens)
    finally:
        config.eos_token_id = saved
    draft = make_draft(target, fusion=fusion, block_size=block_size, cls=OracleDraft, **kwargs)
    return draft.prime(target, reference, corruption, seed, attention_mask, position_offset), reference


# ----------------------------------------------------------------------------------------------
# No silent skips: `make test` (and so CI) sets DFLARE_STRICT_SKIPS=1, and a skipped test then fails
# unless it is listed here with the reason it may skip.
# ----------------------------------------------------------------------------------------------

#: test name (without parameters) -> why it may skip in a strict run. Keep this short.
ALLOWED_SKIPS: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DFLARE_STRICT_SKIPS") == "1" and item.originalname not in ALLOWED_SKIPS:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped in a strict run (DFLARE_STRICT_SKIPS=1): {reason}. Fix the environment "
            "(make test installs everything), or list the test in ALLOWED_SKIPS in tests/conftest.py with the reason."
        )


@pytest.fixture(scope="session")
def smollm2():
    """(target, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once (about 15 s)."""
    from modeling_dflare.targets import load_default

    try:
        return load_default()
    except FileNotFoundError as error:
        pytest.skip(f"embedded SmolLM2 target unavailable: {error}")


__all__ = [
    "ARCHITECTURES",
    "DFlareCandidateGenerator",
    "OracleDraft",
    "VOCAB",
    "VerifyCounter",
    "cached_target",
    "greedy",
    "make_draft",
    "make_oracle",
    "make_target",
    "random_prompt",
    "target_config",
]
