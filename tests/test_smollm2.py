"""The real embedded target (SmolLM2-135M-Instruct): DFlare greedy text equals plain greedy text.

Slow (about a minute on 2 CPU cores): the target is loaded once per test run by the ``smollm2``
fixture. A randomly initialised draft is used, plus the shipped trained draft when
``drafts/smollm2-dflare`` exists.
"""

from pathlib import Path

import pytest
import torch

from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.testing import VerifyCounter

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Give me three tips for staying focused while studying.",
]
MAX_NEW_TOKENS = 32
TRAINED_DRAFT = Path(__file__).resolve().parents[1] / "drafts" / "smollm2-dflare"


def chat_ids(tokenizer, text: str) -> torch.LongTensor:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]


@pytest.fixture(scope="module")
def plain_outputs(smollm2):
    target, tokenizer = smollm2
    outputs = {}
    with torch.no_grad():
        for text in PROMPTS:
            ids = chat_ids(tokenizer, text)
            outputs[text] = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return outputs


def random_draft(target, **kwargs) -> DFlareModel:
    torch.manual_seed(0)
    return DFlareModel(DFlareConfig.from_target_config(target.config, **kwargs)).eval()


@pytest.mark.parametrize(
    "fusion, block_size, path, prompts",
    [
        ("layerwise", 16, "custom", PROMPTS),
        ("layerwise", 16, "stock", PROMPTS[:1]),
        ("shared", 8, "custom", PROMPTS[1:2]),
    ],
)
def test_random_draft_same_text(smollm2, plain_outputs, fusion, block_size, path, prompts):
    target, tokenizer = smollm2
    draft = random_draft(target, fusion=fusion, block_size=block_size)
    kwargs = {"speculation_type": "dflash"} if path == "stock" else {}
    for text in prompts:
        ids = chat_ids(tokenizer, text)
        with torch.no_grad():
            out = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, assistant_model=draft, **kwargs)
        expected = plain_outputs[text]
        assert tokenizer.decode(out[0]) == tokenizer.decode(expected[0])
        assert out.tolist() == expected.tolist()


@pytest.mark.skipif(not (TRAINED_DRAFT / "config.json").exists(), reason="drafts/smollm2-dflare not shipped yet")
@pytest.mark.parametrize("path", ["custom", "custom-bf16", "stock", "static", "static-compiled"])
def test_trained_draft_same_text_and_accepts(smollm2, plain_outputs, path):
    """The draft (bf16 as saved) runs as its int8 CPU copy by default on a CPU without native bf16
    ("custom"), as loaded when the generation config says so ("custom-bf16"), through
    transformers' stock DFlash generator ("stock"), and through the fixed-shape verify
    (``dflare_static_verify=True``), eager and ``torch.compile``'d."""
    import copy

    from transformers import AutoModel

    from modeling_dflare.cpu_kernels_dflare import bf16_is_native

    target, tokenizer = smollm2
    draft = AutoModel.from_pretrained(TRAINED_DRAFT, trust_remote_code=True).eval()
    kwargs = {"speculation_type": "dflash"} if path == "stock" else {}
    if path == "custom-bf16":
        kwargs["generation_config"] = copy.deepcopy(target.generation_config)
        kwargs["generation_config"].dflare_int8_draft = False
    if path.startswith("static"):
        kwargs["generation_config"] = copy.deepcopy(target.generation_config)
        kwargs["generation_config"].dflare_static_verify = True
        kwargs["generation_config"].disable_compile = path == "static"
    accepted = tokens = calls = 0
    for text in PROMPTS if path in ("custom", "static") else PROMPTS[:1]:
        ids = chat_ids(tokenizer, text)
        with VerifyCounter(target) as counter, torch.no_grad():
            out = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, assistant_model=draft, **kwargs)
        assert out.tolist() == plain_outputs[text].tolist()
        tokens += out.shape[1] - ids.shape[1]
        calls += counter.calls
        if path.startswith("static"):
            accepted += sum(draft.dflare_stats.accepted)
            assert set(draft.dflare_stats.proposed) == {draft.config.block_size - 1}  # whole blocks, every cycle
        if path.startswith("custom"):
            accepted += sum(draft.dflare_stats.accepted)
            assert draft.dflare_stats.draft_precision == ("int8" if path == "custom" and not bf16_is_native() else "bfloat16")
    # A trained draft must get some drafts accepted: fewer target forwards than tokens.
    if not path.startswith("static"):  # a compiled forward is not seen by the counter's hook; the stats say it instead
        assert calls < tokens, (calls, tokens)
    else:
        assert len(draft.dflare_stats.proposed) < MAX_NEW_TOKENS
    if path != "stock":
        assert accepted > 0


@pytest.mark.parametrize("name", ["smollm2-dflare", "smollm2-dflash"])
def test_shipped_drafts_know_the_weights_they_were_trained_against(smollm2, name):
    """The shipped drafts were trained against the Q4_1 GGUF dequantised to fp32 although their
    config names the Hub checkpoint: their fingerprint is that of the embedded target, so the Hub
    bf16 original (other weights, same name) gets the mismatch warning."""
    from modeling_dflare.generation_dflare import fingerprints_match, target_fingerprint

    target, _ = smollm2
    config = DFlareConfig.from_pretrained(TRAINED_DRAFT.parent / name)
    assert config.target_name_or_path == target.config.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.target_fingerprint and fingerprints_match(config.target_fingerprint, target_fingerprint(target))


def test_distill_teacher_rebuilds_smollm2_logits_from_cached_features(smollm2):
    """``--distill`` on the real target: from the features as the cache stores them (bf16, the
    shipped draft's 9 layers, the deepest being 28 of 0-29) the rebuilt logits (layer 29, norm,
    head) pick the target's greedy token at nearly every position of a real chat."""
    from modeling_dflare.training import TargetFeatures
    from modeling_dflare.training.distill import TeacherHead
    from modeling_dflare.training.features import Features

    target, tokenizer = smollm2
    layer_ids = DFlareConfig.from_pretrained(TRAINED_DRAFT).target_layer_ids
    assert max(layer_ids) < target.config.num_hidden_layers - 1  # a layer is left to run
    ids = chat_ids(tokenizer, PROMPTS[1] + " Explain each step and give an example call.")
    features = TargetFeatures(target).compute(ids, layer_ids)
    stored = Features(features.hidden.to(torch.bfloat16).float(), features.predictions)
    teacher = TeacherHead(target, layer_ids, target.get_output_embeddings().weight.detach())
    assert teacher.agreement(stored) >= 0.95
    with torch.no_grad():
        full = target(ids).logits[0, -3:]
    rebuilt = teacher.logits(TargetFeatures(target).compute(ids, layer_ids), torch.arange(ids.shape[1] - 3, ids.shape[1]))
    torch.testing.assert_close(rebuilt, full, rtol=1e-3, atol=1e-3)
