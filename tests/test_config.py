"""DFlareConfig: construction from a target, validation messages, and draft/target mismatch errors."""

import logging

import pytest
import torch
from conftest import cached_target
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig

from modeling_dflare import DFlareConfig, DFlareModel, check_draft_matches_target, spread_layer_ids
from modeling_dflare.configuration_dflare import DFlareConfigError
from modeling_dflare.testing import ARCHITECTURES, VerifyCounter, greedy, make_draft, make_target, random_prompt, target_config


def config_error(expected=ValueError, **kwargs) -> str:
    """The message a user sees for ``DFlareConfig(**kwargs)``.

    Bad values raise ``DFlareConfigError``: a ``ValueError`` that is also transformers' usual
    ``StrictDataclassClassValidationError``. Wrong types stay transformers' field ``TypeError`` wrapper.
    """
    with pytest.raises(expected) as info:
        DFlareConfig(**kwargs)
    error = info.value
    assert isinstance(error, StrictDataclassError)  # what transformers users already catch
    return str(error)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        (dict(fusion="bogus"), "fusion", "'bogus'"),
        (dict(fusion_init_logit=float("inf")), "fusion_init_logit", "inf"),
        (dict(block_size=1), "block_size", "1"),
        (dict(block_size=0), "block_size", "0"),
        (dict(vocab_size=100, mask_token_id=100), "mask_token_id", "100"),
        (dict(mask_token_id=-1), "mask_token_id", "-1"),
        (dict(confidence_threshold=1.5), "confidence_threshold", "1.5"),
        (dict(target_layer_ids=[1, 40], num_target_hidden_layers=30), "target_layer_ids", "40"),
        (dict(target_layer_ids=[]), "target_layer_ids", "empty"),
        (dict(target_layer_ids=[2, 2]), "target_layer_ids", "[2, 2]"),
        (dict(num_attention_heads=9, num_key_value_heads=2), "num_attention_heads", "9"),
        (dict(draft_vocab_size=0), "draft_vocab_size", "0"),
        (dict(vocab_size=10, mask_token_id=1, draft_vocab_size=11), "draft_vocab_size", "11"),
        (dict(num_hidden_layers=0), "num_hidden_layers", "0"),
    ],
)
def test_bad_config_values_name_field_and_value(kwargs, field, value):
    message = config_error(**kwargs)
    assert field in message and value in message, message
    assert isinstance(pytest.raises(DFlareConfigError, DFlareConfig, **kwargs).value, ValueError)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [(dict(block_size="16"), "block_size", "'16'"), (dict(target_layer_ids="1,2"), "target_layer_ids", "1,2")],
)
def test_wrong_types_name_field_and_value(kwargs, field, value):
    message = config_error(StrictDataclassError, **kwargs)
    assert field in message and value in message, message


def test_validate_after_assignment_raises_value_error():
    config = DFlareConfig()
    config.block_size = 1  # assignment only type-checks
    with pytest.raises(ValueError, match="block_size=1"):
        config.validate()


def test_validation_also_runs_on_load(tmp_path):
    """A config.json edited by hand is validated on load, with the same message."""
    import json

    config = DFlareConfig(vocab_size=100, mask_token_id=3, num_target_hidden_layers=8)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["block_size"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="block_size=1"):
        DFlareConfig.from_pretrained(tmp_path)


def test_defaults_are_valid_and_roundtrip():
    config = DFlareConfig()
    assert config.fusion == "layerwise" and config.block_size == 16
    assert config.num_target_layers == 9 and len(set(config.target_layer_ids)) == 9
    again = DFlareConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    shared = DFlareConfig(fusion="shared")
    assert shared.num_target_layers == 5


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 9, 12, 30, 36, 64])
@pytest.mark.parametrize("count", [1, 2, 5, 9, 20])
def test_spread_layer_ids(depth, count):
    ids = spread_layer_ids(depth, count)
    assert ids == sorted(set(ids)), ids
    assert all(0 <= i < depth for i in ids), ids
    assert 1 <= len(ids) <= min(count, depth)
    if depth > 3 and count > 1:
        # Leaves out the first and last layers (near-embedding / LM-head specialised).
        assert ids[0] >= 1 and ids[-1] <= depth - 2
    if count <= depth - 2:
        assert len(ids) == count  # no collapse when there is room


def test_spread_layer_ids_rejects_zero():
    with pytest.raises(ValueError, match="got 0"):
        spread_layer_ids(10, 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_from_target_config_matches_geometry(arch, fusion):
    tconfig = target_config(arch)
    config = DFlareConfig.from_target_config(tconfig, fusion=fusion, block_size=8)
    assert config.hidden_size == tconfig.hidden_size
    assert config.vocab_size == tconfig.vocab_size
    assert config.num_attention_heads == tconfig.num_attention_heads
    assert config.num_key_value_heads == tconfig.num_key_value_heads
    assert config.head_dim == getattr(tconfig, "head_dim", tconfig.hidden_size // tconfig.num_attention_heads)
    assert config.num_target_hidden_layers == tconfig.num_hidden_layers
    assert config.target_model_type == tconfig.model_type
    assert config.fusion == fusion and config.block_size == 8
    assert all(0 <= i < tconfig.num_hidden_layers for i in config.target_layer_ids)
    assert isinstance(config.rope_parameters, dict) and "rope_theta" in config.rope_parameters


@pytest.mark.parametrize("fusion, expected", [("layerwise", 9), ("shared", 5)])
def test_from_target_config_default_layer_counts(fusion, expected):
    # SmolLM2-135M's geometry (30 layers), without building the model.
    tconfig = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, eos_token_id=2, pad_token_id=None,
    )
    config = DFlareConfig.from_target_config(tconfig, fusion=fusion)
    assert config.num_target_layers == expected
    assert config.mask_token_id == 2  # no pad token: falls back to eos
    assert config.head_dim == 64


def test_from_target_config_rejects_bad_fusion():
    with pytest.raises(ValueError, match="fusion='dflash'"):
        DFlareConfig.from_target_config(target_config("llama"), fusion="dflash")


def test_layerwise_fusion_init_is_near_one_hot():
    target = cached_target("gemma3")
    draft = make_draft(target, fusion="layerwise", num_hidden_layers=3, fusion_init_logit=2.0)
    weights = draft.layer_fusion_weights.detach()
    assert weights.shape == (3, draft.config.num_target_layers)
    assert torch.equal((weights == 2.0).sum(-1), torch.ones(3, dtype=torch.long))
    assert torch.all((weights == 0) | (weights == 2.0))
    # Deeper draft layers lean on deeper (or equal) target layers.
    assert weights.argmax(-1).tolist() == sorted(weights.argmax(-1).tolist())


# ----------------------------------------------------------------------------------------------
# Draft / target mismatches: a clear ValueError before any target forward, on both paths
# ----------------------------------------------------------------------------------------------


def _mismatched_drafts():
    return {
        "hidden size": (make_draft(make_target("llama", hidden_size=48)), ["hidden size", "48", "32"]),
        "vocab size": (make_draft(make_target("llama", vocab_size=120)), ["vocab", "120", "100"]),
        "layer id": (
            DFlareModel(DFlareConfig.from_target_config(target_config("llama", num_hidden_layers=8), block_size=4)),
            ["target_layer_ids", "past the target's 3 layers"],
        ),
    }


@pytest.mark.parametrize("path", ["custom", "stock"])
@pytest.mark.parametrize("case", ["hidden size", "vocab size", "layer id"])
def test_mismatched_draft_raises_before_generation(case, path):
    draft, fragments = _mismatched_drafts()[case]
    target = cached_target("llama")
    kwargs = {"speculation_type": "dflash"} if path == "stock" else {}
    with VerifyCounter(target) as counter, pytest.raises(ValueError) as info:
        greedy(target, random_prompt(5), max_new_tokens=5, assistant_model=draft, **kwargs)
    message = str(info.value)
    assert "DFlare" in message and all(f in message for f in fragments), message
    assert counter.calls == 0, "the error must come before any target forward"


def test_check_draft_matches_target_direct():
    target = cached_target("qwen3")
    check_draft_matches_target(make_draft(target), target)  # no error
    with pytest.raises(ValueError, match="hidden size: draft 48, target 32"):
        check_draft_matches_target(make_draft(make_target("qwen3", hidden_size=48)), target)


@pytest.fixture
def fresh_warnings():
    import modeling_dflare.generation_dflare as module

    module._WARNED.clear()
    yield module._WARNED
    module._WARNED.clear()


def test_soft_mismatch_warns(caplog, fresh_warnings):
    """Same geometry, other family or depth: works, but warns (once) that acceptance will suffer."""
    llama = cached_target("llama")
    draft = make_draft(cached_target("mistral"))  # mistral: 2 layers, llama: 3
    with caplog.at_level(logging.WARNING, logger="modeling_dflare.generation_dflare"):
        check_draft_matches_target(draft, llama)
    text = caplog.text
    assert "'mistral'" in text and "'llama'" in text
    assert "2 layers" in text
    prompt = random_prompt(5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_dflare.generation_dflare"):
        for _ in range(3):
            got = greedy(llama, prompt, max_new_tokens=5, assistant_model=draft)
    assert got.tolist() == greedy(llama, prompt, max_new_tokens=5).tolist()
    assert "acceptance will suffer" not in caplog.text  # already said once


def test_other_checkpoint_of_the_same_family_warns(caplog, fresh_warnings):
    """A draft records its target's name; another checkpoint name warns, a local copy of the same does not."""
    target = make_target("llama")
    target.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    draft = make_draft(target)
    assert draft.config.target_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with caplog.at_level(logging.WARNING, logger="modeling_dflare.generation_dflare"):
        target.config.name_or_path = "/models/smollm2-135m-instruct/"
        check_draft_matches_target(draft, target)
        assert "acceptance may suffer" not in caplog.text
        target.config.name_or_path = "someone/SmolLM2-135M-Instruct-finetuned-math"
        check_draft_matches_target(draft, target)
    assert "'someone/SmolLM2-135M-Instruct-finetuned-math'" in caplog.text and "acceptance may suffer" in caplog.text


def test_same_name_other_weights_warns(caplog, fresh_warnings):
    """A quantised copy renamed to its source's Hub id (or the other way round) must not silence the
    warning: the draft's embedding fingerprint tells the weights apart, bf16 rounding does not."""
    from modeling_dflare.generation_dflare import target_fingerprint

    target = make_target("llama")
    target.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    draft = make_draft(target)
    draft.config.target_fingerprint = target_fingerprint(target)
    with caplog.at_level(logging.WARNING, logger="modeling_dflare.generation_dflare"):
        check_draft_matches_target(draft, target)
        check_draft_matches_target(draft, target.to(torch.bfloat16))  # same weights, another dtype
        assert "other weights" not in caplog.text
        target.to(torch.float32)
        weight = target.get_input_embeddings().weight
        with torch.no_grad():  # 4-bit-like quantisation noise: about 0.1 standard deviation per entry
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1 * weight.std())
        check_draft_matches_target(draft, target)
    assert "trained against other weights of 'HuggingFaceTB/SmolLM2-135M-Instruct'" in caplog.text
    prompt = random_prompt(5)
    assert greedy(target, prompt, max_new_tokens=5, assistant_model=draft).tolist() == greedy(target, prompt, max_new_tokens=5).tolist()


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_key_value_heads", 0),
        ("num_attention_heads", 0),
        ("head_dim", 0),
        ("hidden_size", -8),
        ("intermediate_size", 0),
        ("vocab_size", 10**12),
        ("num_hidden_layers", 10**12),
        ("num_target_hidden_layers", 0),
        ("block_size", 10**9),
        ("max_position_embeddings", 0),
    ],
)
def test_sizes_out_of_range_name_field_and_value_before_anything_is_built(tmp_path, field, value):
    """A size out of range (zero heads, a negative width, a trillion layers) in a config.json is a
    ValueError naming the field and value when the config loads, before any division by it and before
    any list or tensor is built from it (no ZeroDivisionError, no MemoryError); its message is one line."""
    import json

    DFlareConfig(vocab_size=100, mask_token_id=3, num_target_hidden_layers=8).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        DFlareConfig.from_pretrained(tmp_path)
    assert isinstance(info.value, DFlareConfigError)
    message = str(info.value)
    assert f"{field}={value}" in message and "expected an integer in [" in message, message
    assert "\n" not in message
    with pytest.raises(ValueError, match=f"{field}={value}"):
        DFlareModel.from_pretrained(tmp_path)


def test_a_size_assigned_later_is_checked_before_the_validators_that_divide_by_it():
    config = DFlareConfig()
    config.num_key_value_heads = 0  # assignment only type-checks
    with pytest.raises(ValueError, match=r"num_key_value_heads=0: expected an integer in \[1, "):
        config.validate()
