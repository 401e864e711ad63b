"""Property test: DFlare greedy output always equals plain greedy output.

Hypothesis draws a tiny random target (Llama, Qwen3, Mistral or Gemma3 with a short sliding
window), a draft (random, or the oracle of conftest with a random corruption rate, so that blocks
are partly or fully accepted), the fusion mode, block size, draft depth and target layer count,
the generator (ours or the stock DFlash one), a prompt (length, left padding), and generation
settings (draft dtype fp32/bf16, max_new_tokens, an eos token taken from the true continuation, repetition penalty,
no-repeat n-grams, a stop-on-token criterion, a confidence threshold, a reduced draft vocabulary).
The number of examples is fixed (``DFLARE_FUZZ_EXAMPLES``, default 120) and derandomised so CI runs
the same cases; ``DFLARE_FUZZ_RANDOM=1`` explores fresh ones from a printed seed
(``DFLARE_FUZZ_SEED=<seed>`` replays them).

Sampling (``do_sample=True``) cannot be checked by equality: a second property test draws a tiny
8-token target of any architecture, a draft (random, oracle-steered or primed through the real
``_propose``), the generator, block size, temperature, top-k, draft dtype, reduced vocabulary,
confidence cut and prompt-lookup hybrid, and checks 400 sampled continuations against the target's
exact distribution (chi-square over every consecutive token pair, drafted pairs included).
"""

import os
import random

import pytest
import torch
from conftest import ARCHITECTURES, StopOnToken, VerifyCounter, greedy, make_draft, make_oracle, make_target
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper, TopKLogitsWarper

from modeling_dflare.testing import NEW_TOKENS, SAMPLING_VOCAB, chi_square_pvalue, exact_joint, sample_continuations

FUZZ_EXAMPLES = int(os.environ.get("DFLARE_FUZZ_EXAMPLES", "120"))
SAMPLING_EXAMPLES = int(os.environ.get("DFLARE_FUZZ_SAMPLING_EXAMPLES", "8"))
# DFLARE_FUZZ_RANDOM=1 explores new cases on every run (for local bug hunting; CI stays derandomised),
# from a seed that every failure message and the summary line print; DFLARE_FUZZ_SEED replays it.
FUZZ_RANDOM = os.environ.get("DFLARE_FUZZ_RANDOM") == "1" or bool(os.environ.get("DFLARE_FUZZ_SEED"))
FUZZ_SEED = int(os.environ.get("DFLARE_FUZZ_SEED") or (random.SystemRandom().randrange(1, 2**31) if FUZZ_RANDOM else 0))
SEED_NOTE = f"random fuzz seed {FUZZ_SEED} (replay: DFLARE_FUZZ_SEED={FUZZ_SEED})" if FUZZ_RANDOM else "derandomised CI cases"
RAN = {"cases": 0, "accepted_cases": 0, "sampling_cases": 0, "sampling_accepted": 0}


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(ARCHITECTURES))
    layers = draw(st.integers(2, 4))
    case = dict(
        arch=arch,
        target_seed=draw(st.integers(0, 10_000)),
        target_layers=layers,
        fusion=draw(st.sampled_from(["layerwise", "shared"])),
        block_size=draw(st.sampled_from([2, 3, 4, 7, 16])),
        draft_layers=draw(st.integers(1, 2)),
        num_target_layers=draw(st.integers(1, layers)),
        oracle=draw(st.sampled_from([True, True, False])),
        corruption=draw(st.sampled_from([0.0, 0.1, 0.3, 0.7])),
        path=draw(st.sampled_from(["custom", "stock"])),
        prompt=draw(st.lists(st.integers(0, 99), min_size=1, max_size=20)),
        left_pad=draw(st.sampled_from([0, 0, 3])),
        max_new_tokens=draw(st.one_of(st.integers(1, 30), st.sampled_from([17, 24, 30]))),
        eos_index=draw(st.one_of(st.none(), st.integers(0, 29))),
        stop_index=draw(st.one_of(st.none(), st.integers(1, 29))),
        repetition_penalty=draw(st.sampled_from([None, None, 1.5])),
        no_repeat_ngram_size=draw(st.sampled_from([None, None, 3])),
        draft_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
    )
    if case["path"] == "custom":
        case["confidence_threshold"] = draw(st.sampled_from([0.0, 0.0, 0.2]))
        case["draft_vocab_size"] = draw(st.sampled_from([None, None, 50]))
        case["prompt_lookup_ngram"] = draw(st.sampled_from([0, 0, 3]))
        case["prompt_lookup_min_ngram"] = draw(st.sampled_from([1, 2]))
        case["prompt_lookup_confidence"] = draw(st.sampled_from([0.3, 0.9]))
    return case


def run_case(case):
    overrides = dict(num_hidden_layers=case["target_layers"])
    if case["arch"] == "gemma3":  # alternate sliding (window 8) and full attention layers
        overrides["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(case["target_layers"])]
    target = make_target(case["arch"], seed=case["target_seed"], **overrides)
    prompt = torch.tensor([case["prompt"]])
    mask = None
    if case["left_pad"]:
        pad = case["left_pad"]
        prompt = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt], dim=-1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, prompt.shape[1] - pad, dtype=torch.long)], dim=-1)
        target.generation_config.pad_token_id = 0

    draft_kwargs = dict(
        fusion=case["fusion"],
        block_size=case["block_size"],
        num_hidden_layers=case["draft_layers"],
        num_target_layers=case["num_target_layers"],
        confidence_threshold=case.get("confidence_threshold", 0.0),
        draft_vocab_size=case.get("draft_vocab_size"),
        prompt_lookup_ngram=case.get("prompt_lookup_ngram", 0),
        prompt_lookup_min_ngram=case.get("prompt_lookup_min_ngram", 2),
        prompt_lookup_confidence=case.get("prompt_lookup_confidence", 0.3),
    )
    if case["oracle"]:
        offset = case["left_pad"] if case["path"] == "stock" else 0
        draft, reference = make_oracle(
            target, prompt, corruption=case["corruption"], attention_mask=mask, position_offset=offset, extra_tokens=48, **draft_kwargs
        )
    else:
        draft = make_draft(target, **draft_kwargs)
        reference = greedy(target, prompt, attention_mask=mask, max_new_tokens=30)
    continuation = reference[0, prompt.shape[1] :].tolist()
    draft = draft.to(case["draft_dtype"])

    kwargs = dict(max_new_tokens=case["max_new_tokens"], attention_mask=mask)
    if case["eos_index"] is not None and case["eos_index"] < len(continuation):
        eos = continuation[case["eos_index"]]
        target.generation_config.eos_token_id = eos
        if target.generation_config.pad_token_id is None:
            target.generation_config.pad_token_id = eos
    if case["stop_index"] is not None and case["stop_index"] < len(continuation):
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnToken(continuation[case["stop_index"]])])
    for key in ("repetition_penalty", "no_repeat_ngram_size"):
        if case[key] is not None:
            kwargs[key] = case[key]

    expected = greedy(target, prompt, **kwargs)
    if case["path"] == "stock":
        kwargs["speculation_type"] = "dflash"
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, assistant_model=draft, **kwargs)
    assert got.tolist() == expected.tolist(), (SEED_NOTE, case)
    RAN["cases"] += 1
    # Each target forward yields one token unless drafts were accepted.
    if counter.calls < got.shape[1] - prompt.shape[1]:
        RAN["accepted_cases"] += 1


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not FUZZ_RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def fuzz_seed(test):
    return seed(FUZZ_SEED)(test) if FUZZ_RANDOM else test


@fuzz_seed
@fuzz_settings(FUZZ_EXAMPLES)
@given(case=cases())
def test_dflare_greedy_equals_plain_greedy(case):
    run_case(case)


@st.composite
def sampling_cases(draw):
    path = draw(st.sampled_from(["custom", "custom", "stock"]))
    case = dict(
        arch=draw(st.sampled_from(ARCHITECTURES)),
        target_seed=draw(st.integers(0, 10_000)),
        fusion=draw(st.sampled_from(["layerwise", "shared"])),
        block_size=draw(st.sampled_from([2, 3, 4])),
        draft=draw(st.sampled_from(["random", "primed", "primed"])),
        path=path,
        temperature=draw(st.sampled_from([0.7, 1.0, 1.5])),
        top_k=draw(st.sampled_from([0, 0, 4])),
        draft_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        prompt=draw(st.lists(st.integers(0, SAMPLING_VOCAB - 1), min_size=2, max_size=6)),
        sample_seed=draw(st.integers(0, 10_000)),
    )
    if path == "custom":
        case["draft_vocab_size"] = draw(st.sampled_from([None, None, 5]))
        case["confidence_threshold"] = draw(st.sampled_from([0.0, 0.0, 0.1]))
        case["prompt_lookup_ngram"] = draw(st.sampled_from([0, 0, 2]))
        case["prompt_lookup_min_ngram"] = draw(st.sampled_from([1, 2]))
    return case


def run_sampling_case(case, n: int = 400):
    overrides = dict(vocab_size=SAMPLING_VOCAB, num_hidden_layers=2, initializer_range=0.5)
    if case["arch"] == "gemma3":
        overrides["layer_types"] = ["sliding_attention", "full_attention"]
    target = make_target(case["arch"], seed=case["target_seed"], **overrides)
    target.generation_config.eos_token_id = None  # fixed-length continuations: the exact joint has no stop
    prompt = torch.tensor([case["prompt"]])
    draft_kwargs = dict(
        fusion=case["fusion"],
        block_size=case["block_size"],
        draft_vocab_size=case.get("draft_vocab_size"),
        confidence_threshold=case.get("confidence_threshold", 0.0),
        prompt_lookup_ngram=case.get("prompt_lookup_ngram", 0),
        prompt_lookup_min_ngram=case.get("prompt_lookup_min_ngram", 2),
    )
    if case["draft"] == "primed":  # the real generator on the target's own hidden states: drafts get accepted
        draft, _ = make_oracle(target, prompt, **draft_kwargs)
    else:
        draft = make_draft(target, **draft_kwargs)
    draft = draft.to(case["draft_dtype"])
    sampling = dict(temperature=case["temperature"], top_k=case["top_k"])
    warpers = [TemperatureLogitsWarper(case["temperature"])] + ([TopKLogitsWarper(case["top_k"])] if case["top_k"] else [])
    joint = exact_joint(target, prompt, LogitsProcessorList(warpers), NEW_TOKENS)
    kwargs = dict(assistant_model=draft, **sampling)
    if case["path"] == "stock":
        kwargs["speculation_type"] = "dflash"
    samples, accepted, _ = sample_continuations(target, prompt, n, case["sample_seed"], NEW_TOKENS, **kwargs)
    pvalue = chi_square_pvalue(samples, joint)
    # 1e-4: the derandomised CI cases are fixed (they pass or fail the same way every run); a fresh
    # random case fails by chance once in 10,000 -- replay its seed before suspecting a bug.
    assert pvalue > 1e-4, (f"DFlare samples do not follow the target distribution (p={pvalue:.2e})", SEED_NOTE, case)
    RAN["sampling_cases"] += 1
    RAN["sampling_accepted"] += int(accepted > n // 4)


@fuzz_seed
@fuzz_settings(SAMPLING_EXAMPLES)
@given(case=sampling_cases())
def test_dflare_sampling_follows_the_target_distribution(case):
    run_sampling_case(case)


def test_fuzz_ran_enough_cases():
    """Runs after the property test (file order): report and check how many cases really ran."""
    if RAN["cases"] == 0:
        pytest.skip("the property test did not run in this test run")
    print(
        f"\nfuzz ({SEED_NOTE}): {RAN['cases']} greedy cases ran, {RAN['accepted_cases']} with accepted drafts "
        f"(fewer target forwards than new tokens); {RAN['sampling_cases']} sampling cases, "
        f"{RAN['sampling_accepted']} with many drafts accepted"
    )
    assert RAN["cases"] >= FUZZ_EXAMPLES
    assert RAN["accepted_cases"] >= RAN["cases"] // 10
    assert RAN["sampling_cases"] >= SAMPLING_EXAMPLES
    assert RAN["sampling_accepted"] >= 1  # rejection sampling really accepted drafted tokens somewhere
