"""Reliability: generation edge cases, memory, bad draft folders. Each case ends in output
equal to plain ``generate`` or in a clear error; never a silent wrong answer or a hang."""

import gc
import json
import shutil
import tracemalloc
import weakref

import pytest
import torch
from conftest import cached_target
from transformers import AutoModel, StoppingCriteriaList

from modeling_dflare import DFlareCandidateGenerator, DFlareConfig, DFlareModel
from modeling_dflare.testing import (
    NEW_TOKENS,
    SAMPLING_VOCAB,
    OracleDraft,
    StopOnToken,
    VerifyCounter,
    chi_square_pvalue,
    exact_joint,
    greedy,
    make_draft,
    make_oracle,
    make_target,
    path_kwargs,
    random_prompt,
    sample_continuations,
)

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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_lower_precision_draft_with_fp32_target(path, fusion, dtype):
    """A draft in another dtype than the target: its inputs are cast to it, its outputs back, and
    the output is plain greedy's; the rounded oracle still gets blocks accepted."""
    target = cached_target("qwen3")
    prompt = random_prompt(7, seed=5)
    expected = greedy(target, prompt, max_new_tokens=20)
    draft = make_draft(target, fusion=fusion, block_size=8).to(dtype)
    assert greedy(target, prompt, max_new_tokens=20, assistant_model=draft, **path_kwargs(path)).tolist() == expected.tolist()
    oracle, _ = make_oracle(target, prompt, fusion=fusion, block_size=8)
    oracle = oracle.to(dtype)
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, max_new_tokens=20, assistant_model=oracle, **path_kwargs(path))
    assert got.tolist() == expected.tolist()
    assert counter.calls < 20  # rounding of the oracle still gets blocks accepted
    if path == "custom":
        assert oracle.dflare_stats.draft_precision == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("seed", range(3))
def test_fp32_draft_with_bf16_target_emits_the_targets_own_choices(seed):
    """A bf16 target verifies a block in one multi-token forward, whose rounding differs from
    one-token decoding, so DFlare's text may leave plain bf16 greedy's at a near-tie; the equality
    guarantee is for fp32 targets. What must hold: every token DFlare returns is the bf16 target's
    own greedy choice, the argmax of its logits over the returned text up to bf16 rounding (here a
    few units in the last place of the largest logit), and drafts are accepted."""
    target = make_target("llama").to(torch.bfloat16)
    prompt = random_prompt(6, seed=seed)
    for draft in (make_draft(target, block_size=4).float(), make_oracle(target, prompt, block_size=4)[0].float()):
        with VerifyCounter(target) as counter:
            out = greedy(target, prompt, max_new_tokens=24, assistant_model=draft)
        assert out.shape == (1, 30) and out[0, :6].tolist() == prompt[0].tolist()
        with torch.no_grad():
            logits = target(out).logits[0].float()
        tolerance = 0.02 * float(logits.abs().max())
        for position in range(6, 30):
            row = logits[position - 1]
            gap = float(row.max() - row[out[0, position]])
            assert gap <= tolerance, (type(draft).__name__, position, gap, tolerance)
        if isinstance(draft, OracleDraft):
            assert counter.calls < 12, counter.calls  # blocks of the fp32 oracle accepted by the bf16 target


def test_draft_without_weights_is_a_clear_error():
    """A draft left on the meta device (built under init_empty_weights, or offloaded by a
    device_map) is refused before any forward, naming the device; any real device is used as is."""
    target = cached_target("llama")
    draft = make_draft(target).to("meta")
    for path in PATHS:
        with VerifyCounter(target) as counter, pytest.raises(ValueError, match=r"draft has no weights: \S+ \(and \d+ more\) is on the meta device"):
            greedy(target, random_prompt(5), max_new_tokens=4, assistant_model=draft, **path_kwargs(path))
        assert counter.calls == 0


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


#: Sampling settings beyond temperature and top-k (generate applies the repetition penalty first,
#: then temperature, top-k and top-p, in that order: so does the exact joint here).
SAMPLING_PROCESSORS = {
    "top-p": dict(top_p=0.8, temperature=0.7),
    "top-k + top-p + repetition penalty": dict(top_k=6, top_p=0.9, repetition_penalty=1.3),
}


def _processors(settings: dict):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = []
    if "repetition_penalty" in settings:
        processors.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if "temperature" in settings:
        processors.append(TemperatureLogitsWarper(settings["temperature"]))
    if "top_k" in settings:
        processors.append(TopKLogitsWarper(settings["top_k"]))
    processors.append(TopPLogitsWarper(settings["top_p"]))
    return LogitsProcessorList(processors)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("setting", sorted(SAMPLING_PROCESSORS))
def test_sampling_settings_follow_the_target_distribution(setting, path):
    """top-p and the repetition penalty under sampling: 500 continuations of an 8-token target follow
    its exact distribution under the same processors (chi-square over consecutive pairs), with a
    primed draft whose drafts are really accepted."""
    settings = SAMPLING_PROCESSORS[setting]
    target = make_target("mistral", seed=2, vocab_size=SAMPLING_VOCAB, num_hidden_layers=2, initializer_range=0.5)
    prompt = random_prompt(4, seed=6, vocab=SAMPLING_VOCAB)
    probs = exact_joint(target, prompt, _processors(settings), NEW_TOKENS)
    draft, _ = make_oracle(target, prompt, block_size=4)
    samples, accepted, _ = sample_continuations(target, prompt, 500, 17, NEW_TOKENS, assistant_model=draft, **settings, **path_kwargs(path))
    pvalue = chi_square_pvalue(samples, probs)
    assert pvalue > 1e-3, f"{setting} ({path}): DFlare samples do not follow the target distribution (p={pvalue:.2e})"
    if path == "custom":
        assert accepted > 500 / 4, accepted


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


# peft's own call, not this package's: get_peft_model reads transformers' deprecated is_gradient_checkpointing
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
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
