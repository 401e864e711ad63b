"""Reliability: generation edge cases, memory, bad draft folders. Each case ends in output
equal to plain ``generate`` or in a clear error; never a silent wrong answer or a hang."""

import gc
import json
import shutil
import tracemalloc
import weakref

import pytest
import torch
from conftest import (
    StopOnToken,
    VerifyCounter,
    cached_target,
    greedy,
    make_draft,
    make_oracle,
    make_target,
    path_kwargs,
    random_prompt,
)
from transformers import AutoModel, StoppingCriteriaList

from modeling_dflare import DFlareCandidateGenerator, DFlareConfig, DFlareModel

PATHS = ("custom", "stock")


# ----------------------------------------------------------------------------------------------
# Batch size, dtypes, devices
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_batch_above_one_is_a_clear_error(path):
    target = cached_target("llama")
    draft = make_draft(target)
    batch = torch.cat([random_prompt(5, seed=1), random_prompt(5, seed=2)])
    with VerifyCounter(target) as counter, pytest.raises(ValueError) as info:
        greedy(target, batch, max_new_tokens=4, assistant_model=draft, **path_kwargs(path))
    message = str(info.value)
    assert "batch of 2" in message and "once per prompt" in message, message
    assert counter.calls == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_bf16_draft_with_fp32_target(path, fusion):
    target = cached_target("qwen3")
    prompt = random_prompt(7, seed=5)
    expected = greedy(target, prompt, max_new_tokens=20)
    draft = make_draft(target, fusion=fusion, block_size=8).to(torch.bfloat16)
    assert greedy(target, prompt, max_new_tokens=20, assistant_model=draft, **path_kwargs(path)).tolist() == expected.tolist()
    oracle, _ = make_oracle(target, prompt, fusion=fusion, block_size=8)
    oracle = oracle.to(torch.bfloat16)
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, max_new_tokens=20, assistant_model=oracle, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    assert counter.calls < 20  # bf16 rounding of the oracle still gets blocks accepted


def test_fp32_draft_with_bf16_target_runs():
    """A bf16 target's own multi-token verify is not bit-identical to one-token decoding, so only
    shape and sanity are checked here; the equality guarantee is for fp32 targets."""
    target = make_target("llama").to(torch.bfloat16)
    draft = make_draft(target)
    out = greedy(target, random_prompt(5), max_new_tokens=8, assistant_model=draft)
    assert out.shape == (1, 13)


# ----------------------------------------------------------------------------------------------
# Logits processors, sampling settings, stopping
# ----------------------------------------------------------------------------------------------

GREEDY_PROCESSORS = [
    dict(repetition_penalty=1.8),
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=1.3, bad_words_ids=[[5], [7]]),
    dict(suppress_tokens=list(range(0, 100, 3))),
    dict(min_new_tokens=6, eos_token_id=11),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("processors", range(len(GREEDY_PROCESSORS)))
def test_greedy_with_logits_processors(path, processors):
    kwargs = GREEDY_PROCESSORS[processors]
    target = make_target("gemma3" if processors % 2 else "llama")
    prompt = random_prompt(6, seed=processors)
    expected = greedy(target, prompt, max_new_tokens=24, **kwargs)
    for draft in (make_draft(target, block_size=4), make_oracle(target, prompt, block_size=4, corruption=0.2)[0]):
        got = greedy(target, prompt, max_new_tokens=24, assistant_model=draft, **kwargs, **path_kwargs(path))
        assert got.tolist() == expected.tolist(), (kwargs, type(draft).__name__)


@pytest.mark.parametrize("path", PATHS)
def test_sampling_settings_run(path):
    """top-k / top-p / repetition penalty with do_sample: runs, stays in range, honours the length."""
    target = cached_target("mistral")
    draft = make_draft(target, block_size=4)
    prompt = random_prompt(5, seed=3)
    for kwargs in [dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=10, top_p=0.9, repetition_penalty=1.2)]:
        torch.manual_seed(0)
        out = target.generate(prompt, do_sample=True, max_new_tokens=12, assistant_model=draft, **kwargs, **path_kwargs(path))
        assert out.shape == (1, 17) and 0 <= int(out.min()) and int(out.max()) < 100
        assert out[0, :5].tolist() == prompt[0].tolist()


def test_sampling_top_k_one_equals_greedy():
    """top_k=1 sampling is greedy: with the oracle draft the output must equal greedy plain output."""
    target = cached_target("qwen3")
    prompt = random_prompt(6, seed=8)
    expected = greedy(target, prompt, max_new_tokens=20)
    draft, _ = make_oracle(target, prompt, block_size=4, corruption=0.3)
    got = target.generate(prompt, do_sample=True, top_k=1, max_new_tokens=20, assistant_model=draft)
    assert got.tolist() == expected.tolist()
    assert sum(draft.dflare_stats.accepted) > 0


def _fresh_token_mid_block(target, prompt, block_size):
    continuation = greedy(target, prompt, max_new_tokens=3 * block_size)[0, prompt.shape[1] :].tolist()
    for k in range(2, len(continuation)):
        if k % block_size and continuation[k] not in continuation[:k]:
            return k, continuation[k]
    return None


@pytest.mark.parametrize("path", PATHS)
def test_custom_stopping_criteria_mid_block(path):
    """A user stopping criterion that fires inside an accepted block stops where plain generate stops."""
    target = cached_target("llama")
    for seed in range(300, 340):
        prompt = random_prompt(4, seed=seed)
        found = _fresh_token_mid_block(target, prompt, 8)
        if found:
            break
    k, token = found
    criteria = StoppingCriteriaList([StopOnToken(token)])
    expected = greedy(target, prompt, max_new_tokens=24, stopping_criteria=criteria)
    assert expected.shape[1] == prompt.shape[1] + k + 1
    draft, _ = make_oracle(target, prompt, block_size=8)
    got = greedy(target, prompt, max_new_tokens=24, assistant_model=draft, stopping_criteria=criteria, **path_kwargs(path))
    assert got.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from modeling_dflare.targets import load_tokenizer

    try:
        return load_tokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"embedded SmolLM2 tokenizer unavailable: {error}")


@pytest.mark.parametrize("path", PATHS)
def test_stop_strings_mid_block(smollm2_tokenizer, path):
    tokenizer = smollm2_tokenizer
    target = make_target("llama", vocab_size=len(tokenizer))
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    k, token = _fresh_token_mid_block(target, prompt, 8) or pytest.skip("no fresh token")
    stop = tokenizer.decode([token])
    kwargs = dict(max_new_tokens=24, stop_strings=[stop], tokenizer=tokenizer)
    expected = greedy(target, prompt, **kwargs)
    assert expected.shape[1] <= prompt.shape[1] + k + 1
    draft, _ = make_oracle(target, prompt, block_size=8)
    got = greedy(target, prompt, assistant_model=draft, **kwargs, **path_kwargs(path))
    assert got.tolist() == expected.tolist(), (stop, expected.shape, got.shape)


# ----------------------------------------------------------------------------------------------
# Prompts: left padding, empty, at the context limit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padding(arch, path):
    target = make_target(arch)
    target.generation_config.pad_token_id = 0
    prompt = torch.cat([torch.zeros(1, 4, dtype=torch.long), random_prompt(6, seed=4)], dim=-1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=-1)
    expected = greedy(target, prompt, attention_mask=mask, max_new_tokens=20)
    draft = make_draft(target, block_size=4)
    got = greedy(target, prompt, attention_mask=mask, max_new_tokens=20, assistant_model=draft, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    offset = 4 if path == "stock" else 0  # the stock generator passes padding-aware positions
    oracle, _ = make_oracle(target, prompt, block_size=4, attention_mask=mask, position_offset=offset)
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, attention_mask=mask, max_new_tokens=20, assistant_model=oracle, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    assert counter.calls < 20


@pytest.mark.parametrize("path", PATHS)
def test_prompt_of_only_bos(path):
    """No prompt at all: generate starts from the bos token, with or without the draft."""
    target = make_target("llama", bos_token_id=1)
    target.generation_config.bos_token_id = 1
    draft = make_draft(target)
    expected = target.generate(max_new_tokens=8, do_sample=False)
    assert expected.shape == (1, 9)
    got = target.generate(max_new_tokens=8, do_sample=False, assistant_model=draft, **path_kwargs(path))
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("length", [1, 2])
def test_very_short_prompts(length):
    target = cached_target("qwen3")
    prompt = random_prompt(length, seed=length)
    expected = greedy(target, prompt, max_new_tokens=10)
    oracle, _ = make_oracle(target, prompt, block_size=16)
    assert greedy(target, prompt, max_new_tokens=10, assistant_model=oracle).tolist() == expected.tolist()


def test_empty_prompt_fails_like_plain_generate():
    """A [1, 0] prompt fails inside the target itself, with or without a draft (no hang)."""
    target = cached_target("llama")
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(RuntimeError) as plain:
        greedy(target, empty, max_new_tokens=4)
    with pytest.raises(type(plain.value)):
        greedy(target, empty, max_new_tokens=4, assistant_model=make_draft(target))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompt_at_context_limit(arch, path):
    """Prompt ends a few tokens before ``max_position_embeddings``; generation runs past it exactly as
    plain generate does (RoPE targets do not stop there), with blocks crossing the limit."""
    target = make_target(arch, max_position_embeddings=64)
    prompt = random_prompt(60, seed=6)
    expected = greedy(target, prompt, max_new_tokens=12)
    oracle, _ = make_oracle(target, prompt, block_size=8, extra_tokens=24)
    got = greedy(target, prompt, max_new_tokens=12, assistant_model=oracle, **path_kwargs(path))
    assert got.tolist() == expected.tolist()


class HiddenStateSpy(DFlareCandidateGenerator):
    seen: list = []

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, **kwargs):
        if model_outputs is not None and model_outputs.hidden_states is not None:
            HiddenStateSpy.seen.append([h is not None for h in model_outputs.hidden_states])
        return super().get_candidates(input_ids, model_kwargs, model_outputs, **kwargs)


class SpyDraft(DFlareModel):
    candidate_generator_class = HiddenStateSpy


def test_only_the_used_target_layers_are_returned():
    """A long prompt must not materialise every target layer's hidden states: only the draft's layers."""
    target = make_target("qwen3", num_hidden_layers=4, max_position_embeddings=512)
    torch.manual_seed(0)
    config = DFlareConfig.from_target_config(target.config, block_size=4, num_target_layers=2)
    draft = SpyDraft(config).eval()
    HiddenStateSpy.seen = []
    greedy(target, random_prompt(300, seed=1), max_new_tokens=4, assistant_model=draft)
    wanted = [i + 1 for i in config.target_layer_ids]
    assert HiddenStateSpy.seen
    for flags in HiddenStateSpy.seen:
        assert [i for i, kept in enumerate(flags) if kept] == wanted


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


class CacheTracker(DFlareCandidateGenerator):
    caches: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CacheTracker.caches.append(weakref.ref(self.cache))


class TrackedDraft(DFlareModel):
    candidate_generator_class = CacheTracker


def test_draft_cache_is_released_after_generate():
    target = cached_target("llama")
    draft = make_draft(target, cls=TrackedDraft)
    CacheTracker.caches = []
    for seed in range(5):
        greedy(target, random_prompt(6, seed=seed), max_new_tokens=10, assistant_model=draft)
    gc.collect()
    assert len(CacheTracker.caches) == 5
    assert all(ref() is None for ref in CacheTracker.caches), "a generate call kept its draft cache alive"


def test_many_generate_calls_do_not_grow_memory():
    """200 calls (a cheap proxy for 1000): neither Python allocations nor the process RSS accumulate."""
    psutil = pytest.importorskip("psutil")
    target = cached_target("llama")
    prompt = random_prompt(6, seed=1)
    draft = make_draft(target, block_size=4)
    for _ in range(20):  # warm-up: caches, lazy imports, allocator pools
        greedy(target, prompt, max_new_tokens=6, assistant_model=draft)
    gc.collect()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(200):
            greedy(target, prompt, max_new_tokens=6, assistant_model=draft)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 256 * 1024, f"Python memory grew by {growth} bytes over 200 generate calls"
    rss_growth = process.memory_info().rss - rss_before
    assert rss_growth < 32 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB over 200 generate calls"
    assert draft.dflare_stats.cycles == 5  # stats describe the last call only


# ----------------------------------------------------------------------------------------------
# Draft folders on disk
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft") / "ok"
    make_draft(cached_target("llama")).save_pretrained(folder)
    return folder


def _copy(folder, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


@pytest.mark.parametrize("loader", ["auto", "direct"])
def test_missing_weights_file(draft_folder, tmp_path, loader):
    broken = _copy(draft_folder, tmp_path, "missing")
    (broken / "model.safetensors").unlink()
    load = (lambda: AutoModel.from_pretrained(broken, trust_remote_code=True)) if loader == "auto" else (lambda: DFlareModel.from_pretrained(broken))
    with pytest.raises(OSError, match="model.safetensors"):
        load()


@pytest.mark.parametrize("keep", [5, 0.5])
def test_truncated_weights_file(draft_folder, tmp_path, keep):
    broken = _copy(draft_folder, tmp_path, "truncated")
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    for load in (lambda: AutoModel.from_pretrained(broken, trust_remote_code=True), lambda: DFlareModel.from_pretrained(broken)):
        with pytest.raises(OSError, match="truncated or corrupted") as info:
            load()
        assert str(broken) in str(info.value)


def test_config_of_another_model_type(draft_folder, tmp_path):
    """A folder whose config.json is a Llama's: the DFlare class refuses it, and if AutoModel builds
    the other model anyway, generate() does not treat it as a DFlare draft silently."""
    broken = _copy(draft_folder, tmp_path, "other")
    target = cached_target("llama")
    target.config.save_pretrained(broken)
    with pytest.raises(ValueError, match="model_type='llama', expected 'dflare'"):
        DFlareModel.from_pretrained(broken)
    with pytest.raises(ValueError, match="model_type='llama'"):
        DFlareConfig.from_pretrained(broken)
    other = AutoModel.from_pretrained(broken, trust_remote_code=True)
    assert other.config.model_type == "llama"
    # a bare Llama body is no assistant: transformers' own check rejects it, the DFlare hook stays out of the way
    with pytest.raises(AttributeError, match="generation_config"):
        greedy(target, random_prompt(4), max_new_tokens=4, assistant_model=other)


def test_unknown_config_fields_from_a_newer_version(draft_folder, tmp_path):
    newer = _copy(draft_folder, tmp_path, "newer")
    config = json.loads((newer / "config.json").read_text())
    config.update(some_future_field={"a": 1}, draft_head_rank=64)
    (newer / "config.json").write_text(json.dumps(config))
    draft = AutoModel.from_pretrained(newer, trust_remote_code=True)
    assert draft.config.some_future_field == {"a": 1}
    target = cached_target("llama")
    prompt = random_prompt(5)
    assert greedy(target, prompt, max_new_tokens=6, assistant_model=draft).tolist() == greedy(target, prompt, max_new_tokens=6).tolist()


def test_invalid_json_config(draft_folder, tmp_path):
    broken = _copy(draft_folder, tmp_path, "badjson")
    (broken / "config.json").write_text('{"model_type": "dflare", ')
    with pytest.raises(OSError, match="(?i)not a valid JSON"):
        AutoModel.from_pretrained(broken, trust_remote_code=True)


def test_invalid_value_in_saved_config(draft_folder, tmp_path):
    broken = _copy(draft_folder, tmp_path, "badvalue")
    config = json.loads((broken / "config.json").read_text())
    config["fusion"] = "crossattention"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fusion='crossattention'"):
        AutoModel.from_pretrained(broken, trust_remote_code=True)


# ----------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_peft_lora_target(path):
    peft = pytest.importorskip("peft")
    base = make_target("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    target = peft.get_peft_model(base, lora).eval()
    prompt = random_prompt(6, seed=2)
    with torch.no_grad():
        expected = target.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
        with target.disable_adapter():  # sanity: the adapter changes the output
            plain_base = target.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
    assert expected.tolist() != plain_base.tolist()
    draft = make_draft(target.get_base_model(), block_size=4)
    with torch.no_grad():
        got = target.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, assistant_model=draft, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    oracle, _ = make_oracle(target.get_base_model(), prompt, block_size=4)
    with torch.no_grad():
        got = target.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, assistant_model=oracle, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
