"""Lossless generation: DFlare output equals plain ``generate`` output, whatever ``generate`` is asked.

Greedy: token for token, for tiny random Llama / Qwen3 / Mistral / Gemma3 targets, block sizes 2, 4
and 16, both fusion modes, our generator and the stock ``speculation_type="dflash"`` one. A random
draft exercises the rejection path; the oracle draft (modeling_dflare.testing) exercises acceptance,
eos inside an accepted block and the length limit reached mid-block, and the tests check that
acceptance really happened so they cannot pass vacuously.

Sampling: with a vocabulary of 8 tokens the exact distribution of the first tokens is computed by
enumeration and DFlare samples are checked against it with a chi-square test; verifiers told the
wrong proposal distribution are shown to be rejected by the same test.

generate options: hidden states, scores and logits, streamers, the ``dflare_*`` knobs and beam
search either work with a DFlare draft (and are compared with plain ``generate``) or are refused
at once with a message naming the option; the target's cache is passed under the name the
installed transformers does not deprecate.
"""

import pytest
import torch
from conftest import cached_target
from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from modeling_dflare import DFlareCandidateGenerator, DFlareModel
from modeling_dflare.testing import (
    ARCHITECTURES,
    NEW_TOKENS,
    SAMPLING_VOCAB,
    STATIC_ARCHITECTURES,
    VOCAB,
    OracleDraft,
    VerifyCounter,
    chi_square_pvalue,
    config_with,
    exact_joint,
    greedy,
    make_draft,
    make_oracle,
    make_target,
    path_kwargs,
    random_prompt,
    sample_continuations,
    static_config,
)

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
    config = config_with(target, dflare_int8_draft=True)
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
    config = config_with(target, dflare_int8_draft=False)
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
    config = config_with(target, dflare_block_size=4)
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


# ----------------------------------------------------------------------------------------------
# generate options: each works with a DFlare draft, or is refused at once naming the option
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_output_hidden_states_gives_the_user_every_layer(path):
    """``output_hidden_states=True`` with ``return_dict_in_generate``: the generator narrows the
    target's hidden states to its own layers unless the user asked for them all; then the user gets
    every layer at every position, as plain ``generate`` returns them, and the draft reads its own
    from them (drafts still accepted)."""
    target = cached_target("qwen3")
    prompt = random_prompt(5, seed=3)
    draft, _ = make_oracle(target, prompt, block_size=4)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_hidden_states=True)
    expected = greedy(target, prompt, **kwargs)
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, assistant_model=draft, **kwargs, **path_kwargs(path))
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert counter.calls < 12  # blocks were accepted
    assert len(got.hidden_states) == len(expected.hidden_states) == 12  # one entry per new token
    layers = target.config.num_hidden_layers + 1
    for ours, plain in zip(got.hidden_states, expected.hidden_states):
        assert len(ours) == len(plain) == layers and all(h is not None for h in ours)
        for a, b in zip(ours, plain):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # without return_dict_in_generate the flag changes nothing: the same tokens, as a tensor
    got = greedy(target, prompt, assistant_model=draft, max_new_tokens=12, output_hidden_states=True, **path_kwargs(path))
    assert got.tolist() == expected.sequences.tolist()


@pytest.mark.parametrize("path", PATHS)
def test_streamers_stream_exactly_the_returned_text(path, capsys):
    """TextStreamer and TextIteratorStreamer receive accepted blocks several tokens at a time; what
    they stream is the text ``generate`` returns, with and without the draft."""
    import threading

    from transformers import TextIteratorStreamer, TextStreamer

    from modeling_dflare.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(VOCAB)
    target = cached_target("llama")
    prompt = random_prompt(6, seed=21)
    draft, _ = make_oracle(target, prompt, block_size=4)
    expected = greedy(target, prompt, max_new_tokens=20)
    text = tokenizer.decode(expected[0, prompt.shape[1] :], skip_special_tokens=True)
    assert len(text.split()) > 5

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    chunks, put = [], streamer.put
    streamer.put = lambda value: chunks.append(value.numel()) or put(value)
    capsys.readouterr()
    got = greedy(target, prompt, max_new_tokens=20, assistant_model=draft, streamer=streamer, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    assert capsys.readouterr().out == text + "\n"
    assert chunks[0] == prompt.shape[1] and max(chunks[1:]) > 1 and sum(chunks[1:]) == 20  # the prompt, then blocks

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("out", greedy(target, prompt, max_new_tokens=20, assistant_model=draft, streamer=streamer, **path_kwargs(path)))
    )
    worker.start()
    streamed = "".join(streamer)
    worker.join(timeout=60)
    assert result["out"].tolist() == expected.tolist() and streamed == text


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options, named",
    [
        (dict(num_beams=2), "num_beams=2"),
        (dict(num_beams=3, do_sample=True), "num_beams=3"),
        (dict(num_beams=2, num_return_sequences=2), "num_beams=2"),
    ],
)
def test_search_modes_are_refused_instead_of_ignoring_the_draft(options, named, path):
    """Beam search and beam sampling would run without the draft, as transformers ignores an
    assistant there (with a log line): refused before any forward, naming the option."""
    target = cached_target("llama")
    draft = make_draft(target)
    with VerifyCounter(target) as counter, pytest.raises(ValueError) as info:
        greedy(target, random_prompt(5), max_new_tokens=6, assistant_model=draft, **options, **path_kwargs(path))
    message = str(info.value)
    assert named in message and "num_beams=1" in message and "without assistant_model" in message, message
    assert counter.calls == 0
    assert greedy(target, random_prompt(5), max_new_tokens=6, num_beams=2).shape == (1, 11)  # without the draft: beam search as usual


BAD_KNOBS = [
    ("dflare_block_size", 1),
    ("dflare_block_size", 9),  # the draft's config says 8
    ("dflare_block_size", 4.0),
    ("dflare_block_size", True),
    ("dflare_confidence_threshold", 1.5),
    ("dflare_confidence_threshold", -0.1),
    ("dflare_confidence_threshold", float("nan")),
    ("dflare_confidence_threshold", "high"),
    ("dflare_prompt_lookup_ngram", -1),
    ("dflare_prompt_lookup_ngram", 2.5),
    ("dflare_prompt_lookup_min_ngram", 0),
    ("dflare_lookup_confidence", 2),
    ("dflare_int8_draft", "yes"),
    ("dflare_small_row_kernels", "fastest"),
    ("dflare_sampling_proposal", "nucleus"),
    ("dflare_blocksize", 4),  # a typo: not a knob at all
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("knob, value", BAD_KNOBS, ids=[f"{k}={v!r}" for k, v in BAD_KNOBS])
def test_bad_dflare_knobs_are_refused_at_once_naming_field_and_value(knob, value, path):
    target = cached_target("llama")
    draft = make_draft(target, block_size=8)
    config = config_with(target, **{knob: value})
    with VerifyCounter(target) as counter, pytest.raises(ValueError) as info:
        greedy(target, random_prompt(5), assistant_model=draft, generation_config=config, **path_kwargs(path))
    assert f"generation_config.{knob}={value!r}" in str(info.value), str(info.value)
    assert counter.calls == 0


def test_dflare_knobs_at_the_edges_of_their_ranges_run_and_stay_lossless():
    from modeling_dflare.generation_dflare import dflare_settings

    target = cached_target("llama")
    prompt = random_prompt(6, seed=4)
    draft, _ = make_oracle(target, prompt, block_size=8)
    config = config_with(target, max_new_tokens=16)
    expected = greedy(target, prompt, generation_config=config)
    edges = [
        dict(dflare_block_size=2),
        dict(dflare_block_size=8),
        dict(dflare_confidence_threshold=0.0, dflare_lookup_confidence=1.0, dflare_prompt_lookup_ngram=0),
        dict(dflare_confidence_threshold=1.0, dflare_prompt_lookup_ngram=16, dflare_prompt_lookup_min_ngram=1),
        dict(dflare_int8_draft=False, dflare_small_row_kernels=False, dflare_sampling_proposal="argmax"),
        dict(dflare_int8_draft=None, dflare_small_row_kernels=True, dflare_block_size=None),
    ]
    for knobs in edges:
        settings = GenerationConfig(**config.to_dict())
        for knob, value in knobs.items():
            setattr(settings, knob, value)
        assert greedy(target, prompt, assistant_model=draft, generation_config=settings).tolist() == expected.tolist(), knobs
    settings = dflare_settings(GenerationConfig(), draft.config)  # nothing set: the draft's own values
    assert (settings.block_size, settings.confidence_threshold, settings.small_row_kernels, settings.sampling_proposal) == (8, 0.0, "auto", "sample")


def test_target_cache_goes_under_the_name_transformers_does_not_deprecate(monkeypatch):
    """Every forward this package runs on a target passes its cache as ``cache`` where transformers
    renamed it (``past_key_values`` there warns, and goes in 5.40), else as ``past_key_values``; the
    draft's own forward takes either. Nothing here logs a deprecation or raises a FutureWarning."""
    import inspect
    import logging
    import time
    import warnings

    from transformers import DynamicCache

    from modeling_dflare.generation_dflare import cache_argument
    from modeling_dflare.timing import measure_forward_costs

    target = cached_target("llama")
    name = "cache" if "cache" in inspect.signature(type(target).forward).parameters else "past_key_values"
    assert cache_argument(target) == name

    class Wrapper(torch.nn.Module):  # a forward that takes **kwargs (PEFT's): the library decides
        def forward(self, *args, **kwargs):
            return target(*args, **kwargs)

    assert cache_argument(Wrapper()) == name

    class OldRemoteCode(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass

    assert cache_argument(OldRemoteCode()) == "past_key_values"

    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)), raising=False)
    prompt = random_prompt(6, seed=9)
    draft, _ = make_oracle(target, prompt, block_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        expected = greedy(target, prompt, max_new_tokens=10)
        for path in PATHS:
            assert greedy(target, prompt, max_new_tokens=10, assistant_model=draft, **path_kwargs(path)).tolist() == expected.tolist()
        torch.manual_seed(0)
        target.generate(prompt, do_sample=True, max_new_tokens=6, assistant_model=draft)
        assert len(measure_forward_costs(target, prompt, 3, 1, time.perf_counter)) == 3
        # the draft's forward: either name, the same output and the same cache contents
        fresh = make_draft(target, block_size=4)
        inputs = dict(noise_embeds=torch.randn(1, 4, 32), context_hidden_states=torch.randn(1, 3, 32 * len(fresh.config.target_layer_ids)))
        caches = [DynamicCache(config=fresh.config), DynamicCache(config=fresh.config)]
        with torch.no_grad():
            by_cache = fresh(**inputs, cache=caches[0], use_cache=True).last_hidden_state
            by_old_name = fresh(**inputs, past_key_values=caches[1], use_cache=True).last_hidden_state
        assert torch.equal(by_cache, by_old_name) and caches[0].get_seq_length() == caches[1].get_seq_length() == 7
    assert not [m for m in logged if "deprecated" in m], logged


# ----------------------------------------------------------------------------------------------
# Draft/target compatibility
# ----------------------------------------------------------------------------------------------


def _warnings_of_check(caplog, draft, target) -> list[str]:
    import modeling_dflare.generation_dflare as module

    module._WARNED.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger=module.logger.name):
        module.check_draft_matches_target(draft, target)
    return [r.getMessage() for r in caplog.records if r.name == module.logger.name]


def test_fingerprint_of_the_same_weights_silences_the_name_warning(tmp_path, caplog):
    """A target saved to a folder of another name (a local copy of the Hub model the draft was
    trained for) is the same weights: no warning. Other weights under another name still warn, and
    so does a draft that recorded no fingerprint."""
    from transformers import AutoModelForCausalLM

    from modeling_dflare.generation_dflare import target_fingerprint

    target = make_target("llama")
    target.config.name_or_path = "some-org/tiny-llama-instruct"
    draft = make_draft(target)
    assert draft.config.target_name_or_path == "some-org/tiny-llama-instruct"
    draft.config.target_fingerprint = target_fingerprint(target)
    target.save_pretrained(tmp_path / "my-local-copy")
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "my-local-copy")
    assert local.config.name_or_path.endswith("my-local-copy")
    assert _warnings_of_check(caplog, draft, local) == []
    assert _warnings_of_check(caplog, draft, local.to(torch.bfloat16)) == []  # bf16 rounding: the same weights

    other = make_target("llama", seed=5)
    other.save_pretrained(tmp_path / "another-model")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "another-model")
    warned = _warnings_of_check(caplog, draft, other)
    assert len(warned) == 1 and "trained for target 'some-org/tiny-llama-instruct'" in warned[0] and "another-model" in warned[0]

    draft.config.target_fingerprint = None  # nothing recorded: the names are all there is to go by
    warned = _warnings_of_check(caplog, draft, local)
    assert len(warned) == 1 and "my-local-copy" in warned[0]


def test_the_shipped_draft_with_smollm2_loaded_from_a_folder_does_not_warn(smollm2, caplog):
    """The embedded SmolLM2, wherever it was loaded from, is the target the shipped draft was trained
    against: its fingerprint says so, and the folder's name does not matter."""
    from pathlib import Path

    target, _ = smollm2
    draft = DFlareModel.from_pretrained(Path(__file__).resolve().parent.parent / "drafts" / "smollm2-dflare")
    saved = target.config.name_or_path
    target.config.name_or_path = "/models/smollm2-from-gguf"
    try:
        assert _warnings_of_check(caplog, draft, target) == []
    finally:
        target.config.name_or_path = saved


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


SAMPLING_SETTINGS = {
    "t1": dict(temperature=1.0, top_k=0),
    "t0.7-top5": dict(temperature=0.7, top_k=5),
}


def warpers_for(settings) -> LogitsProcessorList:
    processors = [TemperatureLogitsWarper(settings["temperature"])]
    if settings["top_k"]:
        processors.append(TopKLogitsWarper(settings["top_k"]))
    return LogitsProcessorList(processors)


def proposal_config(target, proposal: str) -> GenerationConfig:
    return config_with(target, dflare_sampling_proposal=proposal)


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
    runs = [("random draft, stock dflash", dict(assistant_model=random_draft, speculation_type="dflash"), 3)]
    if setting == "t1":
        runs.append(("random draft", dict(assistant_model=random_draft), 1))
        reduced = make_draft(target, block_size=4, draft_vocab_size=5, confidence_threshold=0.05)
        runs.append(("reduced draft vocab + confidence cut", dict(assistant_model=reduced), 6))
        hybrid = make_draft(target, block_size=4, confidence_threshold=0.99, prompt_lookup_ngram=2, prompt_lookup_min_ngram=1)
        runs.append(("prompt-lookup hybrid", dict(assistant_model=hybrid), 7))
    # The real generator end to end (draft forward, _propose, candidate logits): the draft's hidden
    # states are the target's own on its greedy path, so drafted pairs are often accepted.
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
    # The fixed-shape verify (verify_dflare.py): its own rejection sampling, eager and compiled
    runs.append(("static verify, primed draft", dict(assistant_model=primed, generation_config=static_config(target)), 14))
    runs.append(("static verify, argmax proposal", dict(assistant_model=primed, generation_config=static_config(target, dflare_sampling_proposal="argmax")), 15))
    if setting == "t1":
        runs.append(("static verify compiled, random draft", dict(assistant_model=random_draft, generation_config=static_config(target, compiled=True)), 16))
    for name, kwargs, seed in runs:
        samples, accepted, lookups = sample_continuations(target, prompt, n, seed, NEW_TOKENS, **settings, **kwargs)
        pvalue = chi_square_pvalue(samples, probs)
        assert pvalue > 1e-3, f"{name}: DFlare samples do not follow the target distribution (p={pvalue:.2e})"
        if name in ("real _propose, primed draft", "argmax proposal, primed draft", "static verify, primed draft", "static verify, argmax proposal"):
            assert accepted > n / 4, accepted  # drafted tokens were really accepted, so (t2, t3) tests them
        if name == "prompt-lookup hybrid":
            # with 8 tokens, lookups match and some proposals survive: the hybrid path really ran
            assert lookups > n / 4 and accepted > 0, (lookups, accepted)


class WrongQGenerator(DFlareCandidateGenerator):
    """WRONG on purpose: the real generator, except that it tells rejection sampling q was uniform,
    whatever its drafts were drawn from (the draft's q, or its argmax as one-hot): a draft is then
    accepted with min(1, V * p(x)) instead of min(1, p(x) / q(x)), the bug of reporting another
    distribution than the proposal's. The chi-square tests must catch it (negative controls)."""

    def get_candidates(self, input_ids, *args, **kwargs):
        candidates, logits = super().get_candidates(input_ids, *args, **kwargs)
        return candidates, (torch.zeros_like(logits) if logits is not None else None)


class WrongQDraft(DFlareModel):
    candidate_generator_class = WrongQGenerator


class WrongQPrimedDraft(OracleDraft):
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


def test_chi_square_rejects_a_biased_verifier(sampling_target):
    """The same test, same sample size, flags the argmax proposal told to rejection sampling as
    uniform: proposals near the target's greedy path (a primed draft) are then accepted far too
    often. The exact runs above pass a test that has teeth."""
    settings = SAMPLING_SETTINGS["t1"]
    prompt = random_prompt(4, seed=0, vocab=SAMPLING_VOCAB)
    probs = exact_joint(sampling_target, prompt, warpers_for(settings), NEW_TOKENS)
    biased, _ = make_oracle(sampling_target, prompt, block_size=4, cls=WrongQPrimedDraft)
    config = proposal_config(sampling_target, "argmax")
    samples, accepted, _ = sample_continuations(sampling_target, prompt, 600, 4, NEW_TOKENS, assistant_model=biased, generation_config=config, **settings)
    assert accepted > 600 / 4  # the wrong acceptance rule really ran on many drafts
    assert chi_square_pvalue(samples, probs) < 1e-6
    # the fixed-shape loop's own rejection sampling reads the q it is given, too
    config = static_config(sampling_target, dflare_sampling_proposal="argmax")
    samples, accepted, _ = sample_continuations(sampling_target, prompt, 600, 4, NEW_TOKENS, assistant_model=biased, generation_config=config, **settings)
    assert accepted > 600 / 4
    assert chi_square_pvalue(samples, probs) < 1e-6


def test_sample_token_draws_as_multinomial_does(monkeypatch):
    """The CPU sampler of proposals and verification (the inverse of the cumulative distribution):
    multinomial's shapes, a distribution that passes the same chi-square test, never a token of
    probability 0 (not even when the uniform is rounded up to the total), and multinomial's own
    error for a row it would refuse."""
    from modeling_dflare.testing import _chi_square
    from modeling_dflare.verify_dflare import sample_token

    probs = torch.tensor([0.0, 0.1, 0.0, 0.45, 0.3, 0.15, 0.0])
    torch.manual_seed(0)
    assert sample_token(probs).shape == (1,) and sample_token(probs[None].expand(3, -1)).shape == (3, 1)
    draws = sample_token(probs[None].expand(8000, -1))
    assert probs[draws[:, 0]].min() > 0
    assert _chi_square(draws, probs) > 1e-3
    # the same test has teeth: draws of a nearby distribution fail it
    assert _chi_square(sample_token(torch.tensor([[0.4, 0.3, 0.3]]).expand(8000, -1)), torch.tensor([0.3, 0.3, 0.4])) < 1e-6
    with monkeypatch.context() as patch:
        patch.setattr(torch, "rand", lambda shape, dtype=None: torch.ones(shape, dtype=dtype))  # u * total == total
        assert sample_token(probs).tolist() == [5]
        assert sample_token(probs[None].expand(2, -1)).tolist() == [[5], [5]]
    for bad in (torch.zeros(5), torch.tensor([0.5, float("nan"), 0.5]), torch.tensor([0.5, -0.1, 0.6])):
        with pytest.raises(RuntimeError, match="probability tensor|invalid multinomial|sum of probabilities"):
            sample_token(bad)


def test_unknown_sampling_proposal_is_a_clear_error(sampling_target):
    draft = make_draft(sampling_target, block_size=4)
    config = proposal_config(sampling_target, "nucleus")
    with pytest.raises(ValueError, match="dflare_sampling_proposal='nucleus'"):
        sampling_target.generate(random_prompt(4, vocab=SAMPLING_VOCAB), do_sample=True, max_new_tokens=4, assistant_model=draft, generation_config=config)


def test_sampling_returns_the_targets_scores_and_logits(sampling_target):
    """``return_dict_in_generate`` with ``output_scores`` / ``output_logits`` under sampling: one row
    per new token, each the target's own raw logits (and processed scores) at that position of the
    returned sequence, and every sampled token allowed by its scores (top-k)."""
    settings = SAMPLING_SETTINGS["t0.7-top5"]
    prompt = random_prompt(4, seed=2, vocab=SAMPLING_VOCAB)
    warpers = warpers_for(settings)
    for draft, path in ((make_oracle(sampling_target, prompt, block_size=4)[0], "custom"), (make_draft(sampling_target, block_size=4), "stock")):
        torch.manual_seed(3)
        with torch.no_grad():
            out = sampling_target.generate(
                prompt, do_sample=True, max_new_tokens=10, assistant_model=draft, return_dict_in_generate=True, output_scores=True,
                output_logits=True, **settings, **path_kwargs(path),
            )  # fmt: skip
            logits = sampling_target(out.sequences).logits[0].float()
        new = out.sequences.shape[1] - prompt.shape[1]
        assert new == 10 and len(out.scores) == len(out.logits) == new, (path, new, len(out.scores))
        for i in range(new):
            position = prompt.shape[1] + i
            torch.testing.assert_close(out.logits[i][0], logits[position - 1], rtol=1e-4, atol=1e-4)
            expected = warpers(out.sequences[:, :position], logits[position - 1][None].clone())[0]
            torch.testing.assert_close(out.scores[i][0], expected, rtol=1e-4, atol=1e-4)
            assert torch.isfinite(out.scores[i][0, out.sequences[0, position]]), (path, i)  # inside the top 5
        if path == "custom":
            assert sum(draft.dflare_stats.accepted) > 0  # the rows of accepted drafts came from one verify forward


# ----------------------------------------------------------------------------------------------
# Fixed-shape verify (dflare_static_verify=True): the same outputs through verify_dflare.py's loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("arch", STATIC_ARCHITECTURES)
def test_static_verify_equals_plain_and_verifies_whole_blocks(arch, block_size, fusion):
    """Random drafts (rejections), oracle drafts partly corrupted (acceptance), lengths that end
    mid-block: the output equals plain greedy decoding, and every cycle verified a whole block."""
    target = cached_target(arch)
    config = static_config(target)
    for prompt_len, max_new, corruption in [(1, 1, None), (5, 7, None), (17, 13, None), (6, 2 * block_size + 3, 0.0), (11, 23, 0.25)]:
        prompt = random_prompt(prompt_len, seed=300 + prompt_len)
        if corruption is None:
            draft = make_draft(target, fusion=fusion, block_size=block_size)
        else:
            draft, _ = make_oracle(target, prompt, fusion=fusion, block_size=block_size, corruption=corruption, seed=prompt_len)
        expected = greedy(target, prompt, max_new_tokens=max_new)
        with VerifyCounter(target) as counter:
            got = greedy(target, prompt, max_new_tokens=max_new, assistant_model=draft, generation_config=config)
        assert got.tolist() == expected.tolist(), (arch, block_size, fusion, prompt_len, max_new, corruption)
        stats = draft.dflare_stats
        assert stats.proposed == [block_size - 1] * stats.cycles and counter.calls == 1 + stats.cycles
        assert stats.cycles + sum(stats.accepted) >= max_new - 1  # the last cycle may verify drafts past max_new_tokens
        if corruption == 0.0:
            assert stats.acceptance_length > 1.0 and counter.calls < max_new


def test_static_verify_stops_inside_a_block_where_plain_decoding_stops():
    """eos, a stopping criterion and ``max_length`` each end generation inside an accepted block."""
    from modeling_dflare.testing import StopOnToken

    target = make_target("llama")  # its own copy: the generation config gets an eos token
    block_size = 4
    prompt, k, eos = _eos_inside_block(target, block_size)
    draft, reference = make_oracle(target, prompt, block_size=block_size)
    expected = greedy(target, prompt, max_new_tokens=3 * block_size, stopping_criteria=[StopOnToken(eos)])
    got = greedy(target, prompt, max_new_tokens=3 * block_size, stopping_criteria=[StopOnToken(eos)], assistant_model=draft,
                 generation_config=static_config(target))
    assert got.tolist() == expected.tolist() and got.shape[1] == prompt.shape[1] + k + 1 and reference.shape[1] > got.shape[1]
    target.generation_config.eos_token_id = target.generation_config.pad_token_id = eos
    expected = greedy(target, prompt, max_new_tokens=3 * block_size)
    got = greedy(target, prompt, max_new_tokens=3 * block_size, assistant_model=draft, generation_config=static_config(target))
    assert got.tolist() == expected.tolist() and got[0, -1].item() == eos
    target.generation_config.eos_token_id = None
    for max_length in (6, 7, 14, 27):
        expected = greedy(target, prompt, max_length=max_length)
        got = greedy(target, prompt, max_length=max_length, assistant_model=draft, generation_config=static_config(target))
        assert got.tolist() == expected.tolist() and got.shape[1] == max_length


@pytest.mark.parametrize("arch, fusion, block_size", [("llama", "layerwise", 8), ("qwen3", "shared", 4)])
def test_static_verify_compiled_runs_one_graph_for_every_call(arch, fusion, block_size):
    """Under ``torch.compile`` (as on a GPU): output equal to plain decoding, and one compiled graph
    serves every verify of two calls of different lengths (the shape never changes, the static
    cache is reused), so CUDA graphs can replay it."""
    from torch._dynamo.utils import counters

    target = make_target(arch, seed=5)  # its own copy: the compiled call and the cache are kept on it
    config = static_config(target, compiled=True)
    counters.clear()
    for prompt_len, max_new, corruption in [(9, 21, 0.2), (14, 30, 0.4)]:
        prompt = random_prompt(prompt_len, seed=400 + prompt_len)
        draft, _ = make_oracle(target, prompt, fusion=fusion, block_size=block_size, corruption=corruption, seed=prompt_len)
        expected = greedy(target, prompt, max_new_tokens=max_new)
        got = greedy(target, prompt, max_new_tokens=max_new, assistant_model=draft, generation_config=config)
        assert got.tolist() == expected.tolist(), (prompt_len, max_new)
        assert sum(draft.dflare_stats.accepted) > 0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_static_verify_cache_is_reused_grown_and_rebuilt_for_another_dtype():
    """The static cache kept on the target serves the next call when long enough, a longer call gets
    a longer one, and a target moved to another dtype gets a cache of that dtype."""
    target = make_target("llama", seed=6)  # its own copy: the cache is kept on it
    prompt = random_prompt(5, seed=31)
    draft = make_draft(target, block_size=4)
    for max_new in (10, 12, 300):
        expected = greedy(target, prompt, max_new_tokens=max_new)
        got = greedy(target, prompt, max_new_tokens=max_new, assistant_model=draft, generation_config=static_config(target))
        assert got.tolist() == expected.tolist(), max_new
        if max_new == 10:
            first = target._dflare_static_cache[1]
        elif max_new == 12:
            assert target._dflare_static_cache[1] is first  # reused: the same tensors, so no new compiled graph
    assert target._dflare_static_cache[1] is not first and target._dflare_static_cache[1].layers[0].max_cache_len == 512
    target.to(torch.bfloat16)
    draft.to(torch.bfloat16)
    greedy(target, prompt, max_new_tokens=8, assistant_model=draft, generation_config=static_config(target))
    assert target._dflare_static_cache[0][0] == torch.bfloat16 and target._dflare_static_cache[1].layers[0].keys.dtype == torch.bfloat16


def test_static_verify_returns_scores_logits_and_streams_like_plain():
    from transformers import TextStreamer

    from modeling_dflare.testing import tiny_tokenizer

    target = cached_target("qwen3")
    prompt = random_prompt(5, seed=12)
    draft, _ = make_oracle(target, prompt, block_size=4, corruption=0.3)
    kwargs = dict(max_new_tokens=14, return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = greedy(target, prompt, **kwargs)
    got = greedy(target, prompt, assistant_model=draft, generation_config=static_config(target), **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(got.scores) == len(got.logits) == len(expected.scores) == 14
    for ours, plain in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    streamer = TextStreamer(tiny_tokenizer(VOCAB), skip_prompt=True)
    chunks, put = [], streamer.put
    streamer.put = lambda value: chunks.append(value.numel()) or put(value)
    got = greedy(target, prompt, max_new_tokens=14, assistant_model=draft, generation_config=static_config(target), streamer=streamer)
    assert got.tolist() == expected.sequences.tolist()
    assert chunks[0] == prompt.shape[1] and sum(chunks[1:]) == 14 and max(chunks[1:]) > 1


@pytest.mark.parametrize(
    "case, named",
    [
        ("mistral", "sliding-window attention"),
        ("gemma3", "sliding_attention"),
        ("padded", "padding position"),
        ("attentions", "output_attentions=True"),
        ("cut", "dflare_confidence_threshold=0.3"),
        ("lookup", "dflare_prompt_lookup_ngram=3"),
        ("not-a-bool", "generation_config.dflare_static_verify='yes'"),
        ("stock", "not DFlashTokenCandidateGenerator"),
    ],
)
def test_static_verify_refuses_what_it_cannot_run_exactly(case, named):
    """Refused before any forward, naming the value and what to do instead."""
    target = cached_target(case if case in ("mistral", "gemma3") else "llama")
    draft = make_draft(target, block_size=4)
    prompt = random_prompt(5)
    kwargs = dict(max_new_tokens=6, assistant_model=draft, generation_config=static_config(target))
    if case == "padded":
        kwargs["attention_mask"] = torch.tensor([[0, 1, 1, 1, 1]])
    elif case == "attentions":
        kwargs.update(return_dict_in_generate=True, output_attentions=True)
    elif case == "cut":
        kwargs["generation_config"].dflare_confidence_threshold = 0.3
    elif case == "lookup":
        kwargs["generation_config"].dflare_prompt_lookup_ngram = 3
    elif case == "not-a-bool":
        kwargs["generation_config"].dflare_static_verify = "yes"
    elif case == "stock":
        kwargs["generation_config"].speculation_type = "dflash"
    with VerifyCounter(target) as counter, pytest.raises(ValueError) as info:
        greedy(target, prompt, **kwargs)
    assert named in str(info.value), str(info.value)
    assert counter.calls == 0


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
# The verify forward on the small-row CPU kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_generate_verifying_on_the_rows_kernel_is_identical_to_plain(arch, monkeypatch):
    """The compiled "rows" kernel (each weight row read once for up to 8 rows) in the verify forward:
    greedy output stays plain generate's, token for token, with a draft that is right only part of
    the time (so blocks of every length are verified and cut)."""
    import modeling_dflare.cpu_kernels_dflare as modeling
    from test_cpu_kernels_dflare import RowsSpy, _require_rows_kernel

    _require_rows_kernel(modeling)
    spy = RowsSpy(modeling.rows_kernel())
    monkeypatch.setitem(modeling._ROWS_BUILT, "kernel", spy)
    target = cached_target(arch)
    for seed in range(3):
        prompt = random_prompt(5 + seed, seed=seed)
        draft, _ = make_oracle(target, prompt, block_size=8, corruption=0.3, seed=seed)
        expected = greedy(target, prompt, max_new_tokens=24)
        config = config_with(target, dflare_small_row_kernels="rows")
        got = greedy(target, prompt, max_new_tokens=24, assistant_model=draft, generation_config=config)
        assert got.tolist() == expected.tolist(), (arch, seed)
    assert len(set(spy.calls)) > 2  # the verify ran on it, over blocks of several lengths


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
        config = config_with(target, dflare_small_row_kernels=False)
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
