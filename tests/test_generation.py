"""Lossless generation: DFlare output equals plain ``generate`` output.

Greedy: token for token, for tiny random Llama / Qwen3 / Mistral / Gemma3 targets, block sizes 2, 4
and 16, both fusion modes, our generator and the stock ``speculation_type="dflash"`` one. A random
draft exercises the rejection path; the oracle draft (conftest) exercises acceptance, eos inside
an accepted block and the length limit reached mid-block, and the tests check that acceptance
really happened so they cannot pass vacuously.

Sampling: with a vocabulary of 8 tokens the exact distribution of the first tokens is computed by
enumeration and DFlare samples are checked against it with a chi-square test; a deliberately
biased verifier is shown to be rejected by the same test.
"""

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    VerifyCounter,
    cached_target,
    greedy,
    make_draft,
    make_oracle,
    make_target,
    path_kwargs,
    random_prompt,
)
from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from modeling_dflare import DFlareCandidateGenerator, DFlareModel
from modeling_dflare.testing import NEW_TOKENS, SAMPLING_VOCAB, chi_square_pvalue, exact_joint, sample_continuations

PATHS = ("custom", "stock")
BLOCK_SIZES = (2, 4, 16)
FUSIONS = ("layerwise", "shared")


# ----------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_random_draft_equals_plain(arch, block_size, fusion, path):
    target = cached_target(arch)
    draft = make_draft(target, fusion=fusion, block_size=block_size)
    for prompt_len, max_new in [(1, 1), (5, 7), (17, 13)]:
        prompt = random_prompt(prompt_len, seed=prompt_len)
        expected = greedy(target, prompt, max_new_tokens=max_new)
        got = greedy(target, prompt, max_new_tokens=max_new, assistant_model=draft, **path_kwargs(path))
        assert got.tolist() == expected.tolist(), (arch, block_size, fusion, path, prompt_len, max_new)
    if path == "custom":
        stats = draft.dflare_stats
        # 13 new tokens: one from the prefill, then one bonus per cycle plus any accepted drafts.
        assert stats.cycles + sum(stats.accepted) == 12 and len(stats.proposed) == stats.cycles


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_oracle_draft_accepts_and_equals_plain(arch, block_size, fusion, path):
    """Partly and fully correct blocks; ``max_new_tokens`` ends mid-block for every block size."""
    target = cached_target(arch)
    for prompt_len, max_new, corruption in [(3, 1, 0.0), (6, 2 * block_size + 3, 0.0), (11, 23, 0.25), (2, 37, 0.5)]:
        prompt = random_prompt(prompt_len, seed=100 + prompt_len)
        draft, _ = make_oracle(target, prompt, fusion=fusion, block_size=block_size, corruption=corruption, seed=prompt_len)
        expected = greedy(target, prompt, max_new_tokens=max_new)
        with VerifyCounter(target) as counter:
            got = greedy(target, prompt, max_new_tokens=max_new, assistant_model=draft, **path_kwargs(path))
        assert got.tolist() == expected.tolist(), (arch, block_size, fusion, path, prompt_len, max_new, corruption)
        new_tokens = got.shape[1] - prompt_len
        if max_new > 2:
            # Every target forward yields one token; fewer forwards than tokens means drafts were accepted.
            assert counter.calls < new_tokens, (counter.calls, new_tokens)
        if corruption == 0.0 and max_new > 2:
            full_cycles = (new_tokens - 1) // block_size
            assert counter.calls <= 1 + full_cycles + 1, "a perfect draft should fill every block"
        if path == "custom" and max_new > 2:
            stats = draft.dflare_stats
            assert sum(stats.accepted) == new_tokens - 1 - stats.cycles
            assert stats.acceptance_length > 1.0


def _eos_inside_block(target, block_size: int, seeds=range(200, 260)):
    """(prompt, k, token): the greedy continuation's token at index k (not at a block boundary)
    appears there for the first time, so making it eos ends generation inside a drafted block."""
    for seed in seeds:
        prompt = random_prompt(4, seed=seed)
        continuation = greedy(target, prompt, max_new_tokens=3 * block_size)[0, 4:].tolist()
        for k in range(2, len(continuation)):
            # With a perfect draft, cycle c (c >= 1) yields indices 1 + (c-1)B .. cB: k % B != 0 is mid-block.
            if k % block_size and continuation[k] not in continuation[:k]:
                return prompt, k, continuation[k]
    pytest.skip("no prompt with a fresh token mid-block")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("block_size", (4, 16))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eos_inside_accepted_block(arch, block_size, fusion, path):
    target = make_target(arch)  # its own copy: the generation config gets an eos token
    prompt, k, eos = _eos_inside_block(target, block_size)
    draft, reference = make_oracle(target, prompt, fusion=fusion, block_size=block_size)
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = eos
    expected = greedy(target, prompt, max_new_tokens=3 * block_size)
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, max_new_tokens=3 * block_size, assistant_model=draft, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    assert got.shape[1] == prompt.shape[1] + k + 1 and got[0, -1].item() == eos
    # The drafted block went past the eos (the reference continues after it) and was accepted.
    assert reference.shape[1] > got.shape[1]
    assert counter.calls <= 1 + k // block_size + 1 < k + 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_max_length_reached_mid_block(arch, path):
    """``max_length`` (not ``max_new_tokens``) ends generation inside a fully accepted block."""
    target = cached_target(arch)
    prompt = random_prompt(5, seed=7)
    draft, _ = make_oracle(target, prompt, block_size=16)
    for max_length in (6, 7, 14, 27):
        expected = greedy(target, prompt, max_length=max_length)
        with VerifyCounter(target) as counter:
            got = greedy(target, prompt, max_length=max_length, assistant_model=draft, **path_kwargs(path))
        assert got.tolist() == expected.tolist()
        assert got.shape[1] == max_length
        new_tokens = max_length - prompt.shape[1]
        assert counter.calls == 1 + -(-(new_tokens - 1) // 16)  # prefill, then full blocks of 16


def test_confidence_threshold_and_draft_vocab_stay_lossless():
    """Cutting blocks at low confidence and a reduced draft vocabulary change speed, not output."""
    target = cached_target("qwen3")
    prompt = random_prompt(6, seed=3)
    expected = greedy(target, prompt, max_new_tokens=20)
    for kwargs in [dict(confidence_threshold=0.5), dict(draft_vocab_size=40), dict(confidence_threshold=0.9, draft_vocab_size=7)]:
        draft = make_draft(target, block_size=8, **kwargs)
        assert greedy(target, prompt, max_new_tokens=20, assistant_model=draft).tolist() == expected.tolist(), kwargs
        draft, _ = make_oracle(target, prompt, block_size=8, **kwargs)
        assert greedy(target, prompt, max_new_tokens=20, assistant_model=draft).tolist() == expected.tolist(), kwargs


def test_ngram_continuation_finds_the_latest_longest_match():
    from modeling_dflare.generation_dflare import ngram_continuation

    seq = torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # longest suffix with an earlier match is [2, 3] (the 3-gram [5, 2, 3] never occurred): latest is at 5
    assert ngram_continuation(seq, 3, 4).tolist() == [7, 8, 5, 2]
    assert ngram_continuation(seq, 1, 2).tolist() == [7, 8]
    assert ngram_continuation(torch.tensor([4, 5, 6]), 3, 4).tolist() == []  # nothing repeats
    assert ngram_continuation(torch.tensor([4, 4]), 2, 5).tolist() == [4]  # truncated at the end
    seq = torch.tensor([1, 2, 9, 4, 2])  # only a one-token match ("2"): too short when two are required
    assert ngram_continuation(seq, 3, 2).tolist() == [9, 4]
    assert ngram_continuation(seq, 3, 2, min_ngram=2).tolist() == []


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_lookup_hybrid_is_lossless_and_used(arch):
    """Positions after the confidence cut take a prompt-lookup continuation: output unchanged,
    lookup tokens really proposed, and on a looping continuation really accepted."""
    target = cached_target(arch)
    proposed = accepted = 0
    for seed in range(4):
        base = random_prompt(6, seed=seed)
        prompt = torch.cat([base, base, base[:, :3]], dim=1)  # an n-gram match is available at once
        expected = greedy(target, prompt, max_new_tokens=40)
        # a random draft is never confident: every proposed token comes from the lookup
        draft = make_draft(target, block_size=8, confidence_threshold=0.9, prompt_lookup_ngram=3)
        got = greedy(target, prompt, max_new_tokens=40, assistant_model=draft)
        assert got.tolist() == expected.tolist(), seed
        stats = draft.dflare_stats
        assert stats.lookup_tokens == sum(stats.proposed)
        assert stats.drafted == [0] * stats.cycles  # and the per-cycle record says so
        proposed, accepted = proposed + stats.lookup_tokens, accepted + sum(stats.accepted)
    assert proposed > 0 and accepted > 0, (proposed, accepted)


def test_first_position_is_scored_alone_only_where_blocks_stop_there(monkeypatch):
    """The head product reads every head row, so the first drafted position gets a pass of its own
    only while most blocks of the call stopped there; otherwise one product covers the block.
    Output identical either way."""
    import modeling_dflare.generation_dflare as module

    target = cached_target("llama")
    prompt = random_prompt(6, seed=3)
    expected = greedy(target, prompt, max_new_tokens=20)
    rows, real = [], module.DFlareCandidateGenerator._logits
    monkeypatch.setattr(module.DFlareCandidateGenerator, "_logits", lambda self, hidden: rows.append(hidden.shape[1]) or real(self, hidden))
    weak = make_draft(target, block_size=8, confidence_threshold=0.9)  # never confident: every block stops at once
    assert greedy(target, prompt, max_new_tokens=20, assistant_model=weak).tolist() == expected.tolist()
    assert rows[0] == 7 and len(rows) > 3 and set(rows[1:]) == {1}, rows  # after the first block: the first row alone
    rows.clear()
    strong, _ = make_oracle(target, prompt, block_size=8, confidence_threshold=1e-9)  # always past the cut
    assert greedy(target, prompt, max_new_tokens=20, assistant_model=strong).tolist() == expected.tolist()
    assert len(rows) == len(strong.dflare_stats.proposed) and max(rows) == 7, rows  # one product per block
    assert strong.dflare_stats.drafted == strong.dflare_stats.proposed  # no lookup: every proposal is the draft's


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_draft_stays_lossless(arch, fusion):
    """The int8 CPU copy of the draft (and of its head rows) proposes from approximate logits; the
    target still verifies every token, so the output is plain greedy's. The oracle steers through
    the exact head by default; forced to int8 its proposals go through the quantised head and many
    are still accepted (the path is exercised, not bypassed)."""
    target = cached_target(arch)
    prompt = random_prompt(5, seed=11)
    draft, _ = make_oracle(target, prompt, fusion=fusion, block_size=8)
    expected = greedy(target, prompt, max_new_tokens=24)
    config = GenerationConfig(**target.generation_config.to_dict())
    config.dflare_int8_draft = True
    got = greedy(target, prompt, max_new_tokens=24, assistant_model=draft, generation_config=config)
    assert got.tolist() == expected.tolist()
    stats = draft.dflare_stats
    assert stats.draft_precision == "int8" and sum(stats.accepted) > 0, stats
    got = greedy(target, prompt, max_new_tokens=24, assistant_model=draft)  # the oracle's default: exact fp32
    assert got.tolist() == expected.tolist() and draft.dflare_stats.draft_precision == "float32"


def test_int8_draft_is_the_cpu_default_and_follows_the_weights():
    """An fp32 draft on a CPU runs as its int8 copy unless the generation config says otherwise; a
    bf16 draft too where the CPU has no native bf16 (else it keeps its dtype); forcing int8 where it
    cannot run (a draft in training mode) is a clear error; the copy is built once per set of
    weights and rebuilt when they change."""
    import modeling_dflare.cpu_kernels_dflare as module

    target = cached_target("llama")
    prompt = random_prompt(5, seed=2)
    expected = greedy(target, prompt, max_new_tokens=10)
    draft = make_draft(target, block_size=4)
    assert greedy(target, prompt, max_new_tokens=10, assistant_model=draft).tolist() == expected.tolist()
    assert draft.dflare_stats.draft_precision == "int8"
    fresh = make_draft(target, block_size=4)
    with torch.inference_mode():  # as `dflare demo` calls it: the head rows it caches are inference tensors
        assert greedy(target, prompt, max_new_tokens=10, assistant_model=fresh).tolist() == expected.tolist()
        assert greedy(target, prompt, max_new_tokens=10, assistant_model=fresh).tolist() == expected.tolist()
    assert fresh.dflare_stats.draft_precision == "int8"
    copy = module.int8_draft(draft)
    assert module.int8_draft(draft) is copy and not any(type(m) is torch.nn.Linear for m in copy.modules())
    with torch.no_grad():
        draft.layers[0].mlp.up_proj.weight.mul_(2)
    assert module.int8_draft(draft) is not copy
    config = GenerationConfig(**target.generation_config.to_dict())
    config.dflare_int8_draft = False
    assert greedy(target, prompt, max_new_tokens=10, assistant_model=draft, generation_config=config).tolist() == expected.tolist()
    assert draft.dflare_stats.draft_precision == "float32"
    draft.to(torch.bfloat16)  # how AutoModel.from_pretrained loads a draft saved in bf16
    assert greedy(target, prompt, max_new_tokens=10, assistant_model=draft).tolist() == expected.tolist()
    assert draft.dflare_stats.draft_precision == ("bfloat16" if module.bf16_is_native() else "int8")
    config.dflare_int8_draft = True
    draft.train()
    with pytest.raises(ValueError, match=r"dflare_int8_draft=True: the draft is a torch.bfloat16 model on cpu \(training=True\)"):
        greedy(target, prompt, max_new_tokens=10, assistant_model=draft, generation_config=config)


def test_generation_config_block_size_override():
    """``dflare_block_size`` in the generation config shortens blocks without touching the draft."""
    target = cached_target("llama")
    prompt = random_prompt(5, seed=1)
    draft, _ = make_oracle(target, prompt, block_size=16)
    expected = greedy(target, prompt, max_new_tokens=20)
    config = GenerationConfig(**target.generation_config.to_dict())
    config.dflare_block_size = 4
    got = greedy(target, prompt, max_new_tokens=20, assistant_model=draft, generation_config=config)
    assert got.tolist() == expected.tolist()
    assert max(draft.dflare_stats.proposed) == 3


@pytest.mark.parametrize("path", PATHS)
def test_return_dict_with_scores(path):
    """``return_dict_in_generate`` / ``output_scores``: same sequences, one score row per new token."""
    target = cached_target("mistral")
    prompt = random_prompt(5, seed=12)
    draft, _ = make_oracle(target, prompt, block_size=4, corruption=0.3)
    kwargs = dict(max_new_tokens=14, return_dict_in_generate=True, output_scores=True)
    expected = greedy(target, prompt, **kwargs)
    got = greedy(target, prompt, assistant_model=draft, **kwargs, **path_kwargs(path))
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(got.scores) == len(expected.scores) == 14
    for ours, plain in zip(got.scores, expected.scores):
        assert ours.argmax(-1).item() == plain.argmax(-1).item()
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)


def test_other_assistants_keep_transformers_behaviour():
    """The hook only handles DFlare drafts: a classic assistant still gets AssistedCandidateGenerator."""
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    target, assistant = cached_target("llama"), make_target("llama", seed=5)
    prompt = random_prompt(5, seed=2)
    seen = []
    original = AssistedCandidateGenerator.__init__

    def spy(self, *args, **kwargs):
        seen.append(type(self))
        original(self, *args, **kwargs)

    AssistedCandidateGenerator.__init__ = spy
    try:
        got = greedy(target, prompt, max_new_tokens=6, assistant_model=assistant)
    finally:
        AssistedCandidateGenerator.__init__ = original
    assert seen == [AssistedCandidateGenerator]
    assert got.tolist() == greedy(target, prompt, max_new_tokens=6).tolist()


def test_hook_is_idempotent():
    from transformers import GenerationMixin

    import modeling_dflare.generation_dflare as module

    names = ("_validate_generation_mode", "_assisted_decoding", "_get_candidate_generator")
    hooked = {name: getattr(GenerationMixin, name) for name in names}
    module.install_generate_hook()
    module.install_generate_hook()
    for name in names:
        assert getattr(GenerationMixin, name) is hooked[name], name
        assert hooked[name]._dflare_hook and not getattr(hooked[name].__wrapped__, "_dflare_hook", False), name


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

# SAMPLING_VOCAB = 8 tokens, NEW_TOKENS = 4: with a block of 4 the first cycle proposes 2 drafts and can accept both


@pytest.fixture(scope="module")
def sampling_target():
    return make_target(
        "llama",
        seed=0,
        vocab_size=SAMPLING_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.5,
    )


class GreedyOracleGenerator(DFlareCandidateGenerator):
    """Proposes the target's own greedy continuation of the current sequence, corrupted at random."""

    corruption = 0.3

    def __init__(self, assistant_model, target_model, generation_config, logits_processor=None):
        super().__init__(assistant_model, target_model, generation_config, logits_processor)
        self.target = target_model
        self.rng = torch.Generator().manual_seed(0)

    def _propose(self, input_ids, hidden):
        k = hidden.shape[1]
        sequence = input_ids
        with torch.no_grad():
            for _ in range(k):
                next_id = self.target(sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_id], dim=-1)
        proposal = sequence[:, input_ids.shape[1] :]
        flip = torch.rand(proposal.shape, generator=self.rng) < self.corruption
        noise = torch.randint(0, self.vocab_size, proposal.shape, generator=self.rng)
        self.proposals = getattr(self, "proposals", 0) + proposal.numel()
        return torch.where(flip, noise, proposal)


class BiasedGenerator(GreedyOracleGenerator):
    """WRONG on purpose: proposes the target's argmax but claims q = uniform, so rejection sampling
    accepts the argmax with probability min(1, p * V) instead of p: biased towards the argmax."""

    corruption = 0.0

    def get_candidates(self, input_ids, *args, **kwargs):
        candidates, logits = super().get_candidates(input_ids, *args, **kwargs)
        if logits is not None:
            logits = torch.zeros_like(logits)
        return candidates, logits


class OracleSamplingDraft(DFlareModel):
    candidate_generator_class = GreedyOracleGenerator


class BiasedSamplingDraft(DFlareModel):
    candidate_generator_class = BiasedGenerator


SAMPLING_SETTINGS = {
    "t1": dict(temperature=1.0, top_k=0),
    "t0.7-top5": dict(temperature=0.7, top_k=5),
}


def warpers_for(settings) -> LogitsProcessorList:
    processors = [TemperatureLogitsWarper(settings["temperature"])]
    if settings["top_k"]:
        processors.append(TopKLogitsWarper(settings["top_k"]))
    return LogitsProcessorList(processors)


@pytest.mark.parametrize("setting", sorted(SAMPLING_SETTINGS))
def test_sampling_distribution_matches_target(sampling_target, setting):
    settings = SAMPLING_SETTINGS[setting]
    target = sampling_target
    prompt = random_prompt(4, seed=0, vocab=SAMPLING_VOCAB)
    probs = exact_joint(target, prompt, warpers_for(settings), NEW_TOKENS)
    n = 600

    # Sanity of the exact computation: plain batched sampling agrees with it.
    torch.manual_seed(0)
    with torch.no_grad():
        plain = target.generate(prompt.expand(n, -1), do_sample=True, max_new_tokens=NEW_TOKENS, **settings)[:, 4:]
    assert chi_square_pvalue(plain, probs) > 1e-3

    random_draft = make_draft(target, block_size=4)
    oracle = make_draft(target, block_size=4, cls=OracleSamplingDraft)
    runs = [
        ("oracle draft", dict(assistant_model=oracle), 2),
        ("random draft, stock dflash", dict(assistant_model=random_draft, speculation_type="dflash"), 3),
    ]
    if setting == "t1":
        runs.append(("random draft", dict(assistant_model=random_draft), 1))
        reduced = make_draft(target, block_size=4, draft_vocab_size=5, confidence_threshold=0.05)
        runs.append(("reduced draft vocab + confidence cut", dict(assistant_model=reduced), 6))
        hybrid = make_draft(target, block_size=4, confidence_threshold=0.99, prompt_lookup_ngram=2, prompt_lookup_min_ngram=1)
        runs.append(("prompt-lookup hybrid", dict(assistant_model=hybrid), 7))
    # The real generator end to end (draft forward, _propose, one-hot candidate logits): the draft's
    # hidden states are the target's own on its greedy path, so drafted pairs are often accepted.
    primed, _ = make_oracle(target, prompt, block_size=4)
    runs.append(("real _propose, primed draft", dict(assistant_model=primed), 8))
    # The runs above use the default sampled proposal (drafts drawn from the draft's own processed
    # distribution q, handed to rejection sampling as q); the argmax proposal (one-hot q) as well:
    argmax = proposal_config(target, "argmax")
    runs.append(("argmax proposal, primed draft", dict(assistant_model=primed, generation_config=argmax), 9))
    runs.append(("argmax proposal, random draft", dict(assistant_model=random_draft, generation_config=argmax), 10))
    if setting == "t1":
        runs.append(("argmax proposal, reduced vocab + cut", dict(assistant_model=reduced, generation_config=argmax), 11))
        runs.append(("argmax proposal, hybrid", dict(assistant_model=hybrid, generation_config=argmax), 12))
    for name, kwargs, seed in runs:
        samples, accepted, lookups = sample_continuations(target, prompt, n, seed, NEW_TOKENS, **settings, **kwargs)
        pvalue = chi_square_pvalue(samples, probs)
        assert pvalue > 1e-3, f"{name}: DFlare samples do not follow the target distribution (p={pvalue:.2e})"
        if name == "oracle draft":
            # The oracle's proposals were verified and often accepted (else this would test little).
            assert accepted > n / 2, accepted
        if name in ("real _propose, primed draft", "argmax proposal, primed draft"):
            assert accepted > n / 4, accepted  # drafted tokens were really accepted, so (t2, t3) tests them
        if name == "prompt-lookup hybrid":
            # with 8 tokens, lookups match and some proposals survive: the hybrid path really ran
            assert lookups > n / 4 and accepted > 0, (lookups, accepted)


def proposal_config(target, proposal: str) -> GenerationConfig:
    config = GenerationConfig(**target.generation_config.to_dict())
    config.dflare_sampling_proposal = proposal
    return config


class WrongQGenerator(DFlareCandidateGenerator):
    """WRONG on purpose: samples its drafts from the draft's q but tells rejection sampling that q
    was uniform, so a draft is accepted with min(1, V * p(x)): the bug of reporting another
    distribution than the one the token was drawn from. (Reporting them as one-hot would be exact:
    the one-hot rule holds for any proposal drawn independently of the verifier.)"""

    def get_candidates(self, input_ids, *args, **kwargs):
        candidates, logits = super().get_candidates(input_ids, *args, **kwargs)
        return candidates, (torch.zeros_like(logits) if logits is not None else None)


class WrongQDraft(DFlareModel):
    candidate_generator_class = WrongQGenerator


def test_sampled_proposal_is_accepted_more_often_and_its_q_matters(sampling_target):
    """A draft that knows the target's distribution gets more drafts accepted when it samples from
    that distribution than when it proposes its argmax (1 - TV(p, q) against p(argmax)); and telling
    rejection sampling another q than the one a draft was drawn from is caught by the same test."""
    settings = SAMPLING_SETTINGS["t1"]
    prompt = random_prompt(4, seed=0, vocab=SAMPLING_VOCAB)
    probs = exact_joint(sampling_target, prompt, warpers_for(settings), NEW_TOKENS)
    primed, _ = make_oracle(sampling_target, prompt, block_size=4)
    sampled, argmax = proposal_config(sampling_target, "sample"), proposal_config(sampling_target, "argmax")
    _, argmax_accepted, _ = sample_continuations(
        sampling_target, prompt, 300, 13, NEW_TOKENS, assistant_model=primed, generation_config=argmax, **settings
    )
    _, sample_accepted, _ = sample_continuations(
        sampling_target, prompt, 300, 13, NEW_TOKENS, assistant_model=primed, generation_config=sampled, **settings
    )
    assert sample_accepted > argmax_accepted, (sample_accepted, argmax_accepted)
    wrong = make_draft(sampling_target, block_size=4, cls=WrongQDraft)
    samples, _, _ = sample_continuations(sampling_target, prompt, 600, 14, NEW_TOKENS, assistant_model=wrong, generation_config=sampled, **settings)
    assert chi_square_pvalue(samples, probs) < 1e-6


def test_unknown_sampling_proposal_is_a_clear_error(sampling_target):
    draft = make_draft(sampling_target, block_size=4)
    config = proposal_config(sampling_target, "nucleus")
    with pytest.raises(ValueError, match="dflare_sampling_proposal='nucleus'"):
        sampling_target.generate(random_prompt(4, vocab=SAMPLING_VOCAB), do_sample=True, max_new_tokens=4, assistant_model=draft, generation_config=config)


def test_chi_square_rejects_a_biased_verifier(sampling_target):
    """The same test, same sample size, flags the wrong-q verifier: the check above has teeth."""
    settings = SAMPLING_SETTINGS["t1"]
    prompt = random_prompt(4, seed=0, vocab=SAMPLING_VOCAB)
    probs = exact_joint(sampling_target, prompt, warpers_for(settings), NEW_TOKENS)
    biased = make_draft(sampling_target, block_size=4, cls=BiasedSamplingDraft)
    samples, _, _ = sample_continuations(sampling_target, prompt, 600, 4, NEW_TOKENS, assistant_model=biased, **settings)
    assert chi_square_pvalue(samples, probs) < 1e-6


def test_sampling_with_none_candidate_logits_is_lossless(sampling_target):
    """A generator that returns no candidate logits falls back to transformers' sample-and-compare,
    which is also exact: returning ``None`` is a safe (if slower) choice."""

    class NoLogits(GreedyOracleGenerator):
        def get_candidates(self, input_ids, *args, **kwargs):
            return super().get_candidates(input_ids, *args, **kwargs)[0], None

    class NoLogitsDraft(DFlareModel):
        candidate_generator_class = NoLogits

    settings = SAMPLING_SETTINGS["t1"]
    prompt = random_prompt(4, seed=0, vocab=SAMPLING_VOCAB)
    probs = exact_joint(sampling_target, prompt, warpers_for(settings), NEW_TOKENS)
    draft = make_draft(sampling_target, block_size=4, cls=NoLogitsDraft)
    samples, _, _ = sample_continuations(sampling_target, prompt, 600, 5, NEW_TOKENS, assistant_model=draft, **settings)
    assert chi_square_pvalue(samples, probs) > 1e-3


# ----------------------------------------------------------------------------------------------
# transformers versions: the range is declared once, checked, and the hook refuses a misfit
# ----------------------------------------------------------------------------------------------


def test_installed_transformers_is_in_the_supported_range():
    import configparser
    import re
    from pathlib import Path

    import transformers
    from packaging.specifiers import SpecifierSet

    from modeling_dflare.generation_dflare import SUPPORTED_TRANSFORMERS

    root = Path(__file__).resolve().parent.parent
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    requires = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in requires
    oldest = re.search(r"^OLDEST_TRANSFORMERS := (\S+)$", (root / "Makefile").read_text(), flags=re.M).group(1)
    assert SUPPORTED_TRANSFORMERS.startswith(f">={oldest},")  # CI's second run is the range's lower bound
    assert transformers.__version__ in SpecifierSet(SUPPORTED_TRANSFORMERS)


def test_hook_refuses_transformers_whose_private_signatures_changed():
    import transformers
    from transformers import GenerationMixin

    from modeling_dflare.generation_dflare import SUPPORTED_TRANSFORMERS, check_transformers_compatible

    check_transformers_compatible(GenerationMixin)  # the installed one fits (wrapped methods are unwrapped)

    class Reordered(GenerationMixin):
        def _assisted_decoding(self, input_ids, generation_config, logits_processor, stopping_criteria, **kwargs):
            pass

    with pytest.raises(ImportError) as info:
        check_transformers_compatible(Reordered)
    message = str(info.value)
    assert "_assisted_decoding" in message and "'generation_config', 'logits_processor'" in message
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in message and transformers.__version__ in message

    class NoAssistantKeyword(GenerationMixin):
        def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs):
            pass

    with pytest.raises(ImportError, match=r"_get_candidate_generator takes no assistant_model"):
        check_transformers_compatible(NoAssistantKeyword)


# ----------------------------------------------------------------------------------------------
# Small-row CPU kernels for the verify forward
# ----------------------------------------------------------------------------------------------


def test_small_row_linears_switch_plain_linears_only_and_restore_them():
    from torch import nn

    from modeling_dflare.cpu_kernels_dflare import SMALL_ROWS, small_row_linears

    class Subclassed(nn.Linear):  # e.g. a quantised or LoRA layer: its own forward must stay
        pass

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Subclassed(32, 32), nn.Linear(32, 8, bias=False))
    offloaded = nn.Linear(8, 8)
    offloaded.forward = lambda x: x  # what accelerate's offload hooks do
    model.append(offloaded)
    inputs = [torch.randn(1, rows, 16, generator=torch.Generator().manual_seed(rows)) for rows in (1, 2, 7, SMALL_ROWS, SMALL_ROWS + 1)]
    expected = [model(x) for x in inputs]
    with small_row_linears(model, "packed") as switched:
        assert switched == 2 and "forward" in model[0].__dict__ and "forward" in model[3].__dict__
        assert "forward" not in model[2].__dict__ and offloaded.forward(torch.ones(1)) == 1
        got = [model(x) for x in inputs]
    for x, want, have in zip(inputs, expected, got):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-5, rtol=1e-5), x.shape
    assert "forward" not in model[0].__dict__ and "forward" not in model[3].__dict__  # restored
    assert model(inputs[1]).equal(expected[1])


def test_small_row_linears_one_row_is_stock_except_for_a_wide_head(monkeypatch):
    """One row keeps the stock kernel (bit for bit), except a head-sized weight with 2+ threads,
    which runs as two rows (a threaded GEMM) and agrees to float rounding."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    monkeypatch.setattr(modeling, "WIDE_WEIGHT", 64 * 48)
    narrow, wide = nn.Linear(48, 16), nn.Linear(48, 64, bias=False)
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b, original=torch.Tensor.__matmul__: calls.append(b.shape) or original(a, b))
    try:
        torch.set_num_threads(2)
        with modeling.small_row_linears(nn.Sequential(narrow, wide), "packed"):
            assert narrow(x).equal(nn.functional.linear(x, narrow.weight, narrow.bias)) and calls == []
            got = wide(x)
            assert calls == [(48, 2)]  # the row, twice
            torch.set_num_threads(1)
            assert wide(x).equal(nn.functional.linear(x, wide.weight)) and len(calls) == 1
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (1, 1, 64) and torch.allclose(got, nn.functional.linear(x, wide.weight), atol=1e-5, rtol=1e-5)


def test_small_row_linears_pack_each_weight_once_and_follow_it(monkeypatch):
    """2+ rows run oneDNN's linear on a packed copy of the weight (bias included), made once per
    weight and remade after an in-place update; "matmul" runs W @ x.T and packs nothing; one row
    stays stock; an unknown kernel name is refused."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels are the CPU default and must be tested")
    layer = nn.Linear(48, 40)
    packs, calls = [], []
    monkeypatch.setattr(modeling, "packed_weight", lambda m, original=modeling.packed_weight: calls.append(m) or original(m))
    x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(1))
    one = x[:, :1]
    with modeling.small_row_linears(layer, "packed") as switched:
        assert switched == 1
        first, second = layer(x), layer(x)
        packs.append(modeling._PACKED[layer][1])
        assert layer(one).equal(nn.functional.linear(one, layer.weight, layer.bias)) and len(calls) == 2  # one row: stock
        with torch.no_grad():
            layer.weight.mul_(2)  # the version counter moves: the packed copy is remade
        third = layer(x)
        packs.append(modeling._PACKED[layer][1])
    assert len(calls) == 3 and packs[0] is not packs[1]
    assert first.equal(second) and first.shape == (1, 3, 40)
    with torch.no_grad():
        layer.weight.div_(2)
        want = nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(first, want, atol=1e-5, rtol=1e-5)
        layer.weight.mul_(2)
        assert torch.allclose(third, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    calls.clear()
    with modeling.small_row_linears(layer, "matmul"):
        got = layer(x)
    assert calls == [] and torch.allclose(got, third, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'fast'.*packed"):
        with modeling.small_row_linears(layer, "fast"):
            pass
    assert "forward" not in layer.__dict__


def test_auto_small_row_kernels_take_the_fastest_timed_kernel_per_layer_kind_and_row_count(monkeypatch):
    """``choose_small_row_kernels`` times every candidate on each kind of layer (weight shape, bias,
    layout) for each row count in TIMED_ROWS and keeps the fastest; counts between timed ones take
    the next timed count's choice, counts past the last its choice; the stock kernel stays unless
    another is MIN_GAIN faster. A fake clock that each kernel
    call advances by a set cost stands in for the machine."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels are the CPU default and must be tested")
    monkeypatch.setattr(modeling, "TIMED_ROWS", (1, 2, 4))
    now = [0.0]
    calls = []

    def cost(kernel, module, rows):
        wide = module.out_features == 64
        if rows == 1:
            return {"tworow": 1.0, "stock": 2.0}.get(kernel, 3.0) if wide else {"stock": 1.0}.get(kernel, 2.0)
        if rows == 2:
            return {"matmul": 1.0}.get(kernel, 2.0)
        return {"packed": 0.98, "stock": 1.0}.get(kernel, 2.0)  # under MIN_GAIN faster: the stock kernel stays

    def timed_kernel(kernel, module, flat, original=modeling._run_kernel):
        calls.append((kernel, module, flat.shape[0]))
        now[0] += cost(kernel, module, flat.shape[0])
        return original(kernel, module, flat)

    monkeypatch.setattr(modeling, "_run_kernel", timed_kernel)
    narrow, narrow_too, wide = nn.Linear(48, 16), nn.Linear(48, 16), nn.Linear(48, 64, bias=False)
    chosen = modeling.choose_small_row_kernels([narrow, wide, narrow_too], rounds=3, clock=lambda: now[0])
    assert set(chosen) == {((16, 48), True, True), ((64, 48), False, True)}
    for kernels, one in ((chosen[((16, 48), True, True)], "stock"), (chosen[((64, 48), False, True)], "tworow")):
        assert len(kernels) == modeling.SMALL_ROWS
        assert kernels[:4] == (one, "matmul", "stock", "stock") and set(kernels[4:]) == {"stock"}
    # each kind is timed over all its layers in a row; every candidate of every count once a round (+ a warm-up round)
    narrow_calls = [c for c in calls if c[1] in (narrow, narrow_too)]
    assert [c[1] for c in narrow_calls[:2]] == [narrow, narrow_too]
    assert len(narrow_calls) == 2 * 4 * (4 + 3 + 3)  # 2 layers x 4 rounds x (1 row: 4 candidates; 2, 4 rows: 3)
    assert {c[0] for c in calls if c[2] > 1} == {"stock", "packed", "matmul"}
    # timing packed every weight; no count runs packed here, so no packed copy is kept
    assert not any(module in modeling._PACKED for module in (narrow, narrow_too, wide))


def test_auto_small_row_kernels_are_timed_once_per_model_and_thread_count_and_agree_with_stock(monkeypatch):
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    timings = []
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules, original=modeling.choose_small_row_kernels: timings.append(len(modules)) or original(modules, rounds=1)
    )
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 8, bias=False))
    inputs = [torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(rows)) for rows in (1, 2, 3, 9, 17, modeling.SMALL_ROWS + 1)]
    expected = [model(x) for x in inputs]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for _ in range(2):
            with modeling.small_row_linears(model) as switched:
                # layers the stock kernel suits at every row count stay unswitched
                assert switched == sum("forward" in layer.__dict__ for layer in model) <= 3
                got = [model(x) for x in inputs]
            for x, want, have in zip(inputs, expected, got):
                assert have.shape == want.shape and torch.allclose(have, want, atol=1e-5, rtol=1e-5), x.shape
        assert timings == [3]
        torch.set_num_threads(2)
        with modeling.small_row_linears(model):
            pass
        assert timings == [3, 3]  # another thread count: timed again
    finally:
        torch.set_num_threads(threads)
    assert all("forward" not in layer.__dict__ for layer in model)


def test_auto_small_row_kernels_leave_layers_the_stock_kernel_suits(monkeypatch):
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8))
    kernels = lambda first: tuple([first] + ["stock"] * (modeling.SMALL_ROWS - 1))  # noqa: E731
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules: {modeling._signature(model[0]): kernels("matmul"), modeling._signature(model[1]): kernels("stock")}
    )
    with modeling.small_row_linears(model) as switched:
        assert switched == 1 and "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        x = torch.randn(1, 1, 24)
        assert torch.allclose(model(x), nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias), atol=1e-5)
    assert "forward" not in model[0].__dict__


def test_packed_copies_the_auto_choice_does_not_use_are_freed(monkeypatch):
    """After a fixed "packed" run packed every layer (the bench's cost curve), only the layers the
    timed choice runs packed keep their copy; the others pack again if ever needed."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels must be tested")
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8))
    kernels = lambda last: tuple(["stock"] * (modeling.SMALL_ROWS - 1) + [last])  # noqa: E731
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules: {modeling._signature(model[0]): kernels("packed"), modeling._signature(model[1]): kernels("matmul")}
    )
    x = torch.randn(1, 3, 24)
    with modeling.small_row_linears(model):  # the timed choice: packed for the first layer only
        model(torch.randn(1, modeling.SMALL_ROWS, 24))
    with modeling.small_row_linears(model, "packed"):
        expected = model(x)
    assert model[0] in modeling._PACKED and model[1] in modeling._PACKED
    assert modeling.free_unused_packed_weights(model) == 1
    assert model[0] in modeling._PACKED and model[1] not in modeling._PACKED
    with modeling.small_row_linears(model, "packed"):  # packs again when asked to
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert model[1] in modeling._PACKED


def test_generate_verifies_on_small_row_kernels_unless_told_not_to(monkeypatch):
    import modeling_dflare.cpu_kernels_dflare as modeling
    import modeling_dflare.generation_dflare as generation

    entered = []
    # patched where the generate hook looks it up
    monkeypatch.setattr(generation, "small_row_linears", lambda model, kernels, original=modeling.small_row_linears: entered.append(kernels) or original(model, "packed"))
    target = cached_target("llama")
    prompt = random_prompt(6)
    draft, _ = make_oracle(target, prompt, block_size=4)
    layer = next(m for m in target.modules() if type(m) is torch.nn.Linear)
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append("forward" in module.__dict__))
    try:
        expected = greedy(target, prompt, max_new_tokens=12)
        assert not any(seen)  # plain generate: stock kernels
        seen.clear()
        got = greedy(target, prompt, max_new_tokens=12, assistant_model=draft)
        assert got.tolist() == expected.tolist() and seen and all(seen) and entered == ["auto"]  # the default
        seen.clear()
        config = GenerationConfig(**target.generation_config.to_dict())
        config.dflare_small_row_kernels = False
        got = greedy(target, prompt, max_new_tokens=12, assistant_model=draft, generation_config=config)
        assert got.tolist() == expected.tolist() and seen and not any(seen) and entered == ["auto"]
        seen.clear()
        config.dflare_small_row_kernels = "matmul"
        got = greedy(target, prompt, max_new_tokens=12, assistant_model=draft, generation_config=config)
        assert got.tolist() == expected.tolist() and seen and all(seen) and entered == ["auto", "matmul"]
        config.dflare_small_row_kernels = "fastest"
        with pytest.raises(ValueError, match="dflare_small_row_kernels='fastest'"):
            greedy(target, prompt, max_new_tokens=12, assistant_model=draft, generation_config=config)
    finally:
        handle.remove()
    assert "forward" not in layer.__dict__
