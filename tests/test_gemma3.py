"""A second real architecture: Gemma 3 270M (the ``gemma3`` fixture), beside SmolLM2's Llama.

Gemma 3 differs from Llama where a drafting bug would hide: embeddings scaled by sqrt(hidden),
sliding-window layers between full-attention ones, extra norms around attention and MLP, a 262,144-token
vocabulary tied to the embeddings. With a random draft (every block rejected at once) and with an
oracle draft that knows the target's greedy continuation but is corrupted at random positions (blocks
accepted in part), DFlare's greedy text must equal plain greedy text token for token, on both
generation paths. Slow: the GGUF is dequantised once per test run.
"""

import pytest
import torch

from modeling_dflare.testing import VerifyCounter, greedy, make_draft, make_oracle, path_kwargs

pytestmark = pytest.mark.slow

PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
MAX_NEW_TOKENS = 24


def prompt_ids(tokenizer, text: str) -> torch.LongTensor:
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def plain_outputs(gemma3):
    target, tokenizer = gemma3
    return {text: greedy(target, prompt_ids(tokenizer, text), max_new_tokens=MAX_NEW_TOKENS) for text in PROMPTS}


def test_the_fixture_is_the_real_gemma3(gemma3):
    target, tokenizer = gemma3
    config = target.config
    assert config.model_type.startswith("gemma3"), config.model_type
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    assert tokenizer.decode(prompt_ids(tokenizer, PROMPTS[0])[0], skip_special_tokens=True) == PROMPTS[0]


@pytest.mark.parametrize(
    "fusion, block_size, path, prompts",
    [("layerwise", 8, "custom", PROMPTS), ("layerwise", 8, "stock", PROMPTS[:1]), ("shared", 16, "custom", PROMPTS[1:])],
)
def test_random_draft_same_text(gemma3, plain_outputs, fusion, block_size, path, prompts):
    target, tokenizer = gemma3
    draft = make_draft(target, fusion=fusion, block_size=block_size)
    for text in prompts:
        got = greedy(target, prompt_ids(tokenizer, text), max_new_tokens=MAX_NEW_TOKENS, assistant_model=draft, **path_kwargs(path))
        assert tokenizer.decode(got[0]) == tokenizer.decode(plain_outputs[text][0])
        assert got.tolist() == plain_outputs[text].tolist()


@pytest.mark.parametrize("path", ["custom", "stock"])
def test_partly_right_drafts_accept_and_keep_the_text(gemma3, plain_outputs, path):
    """Drafts right at most positions: whole blocks and parts of blocks are accepted, and the text
    stays the target's own (fewer target forwards than tokens proves drafts were accepted)."""
    target, tokenizer = gemma3
    for seed, text in enumerate(PROMPTS):
        ids = prompt_ids(tokenizer, text)
        draft, _ = make_oracle(target, ids, block_size=8, corruption=0.2, seed=seed, extra_tokens=MAX_NEW_TOKENS + 16)
        with VerifyCounter(target) as counter:
            got = greedy(target, ids, max_new_tokens=MAX_NEW_TOKENS, assistant_model=draft, **path_kwargs(path))
        assert got.tolist() == plain_outputs[text].tolist()
        new_tokens = got.shape[1] - ids.shape[1]
        assert counter.calls < new_tokens / 2, (counter.calls, new_tokens)
