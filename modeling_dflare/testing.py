"""Tiny real components for tests and examples: a word-level chat tokenizer and random targets.

Nothing here is a mock: the tokenizer is a real ``PreTrainedTokenizerFast`` with a chat template,
and the targets are real transformers causal LMs with random weights.
"""

import torch

TINY_WORDS = [f"w{i}" for i in range(88)]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_tokenizer():
    """A 96-token word-level tokenizer (``w0`` .. ``w87`` plus specials) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_target(arch: str = "llama", vocab_size: int = 96, num_hidden_layers: int = 4, seed: int = 0, **overrides):
    """A random causal LM of the given architecture (llama, qwen3, mistral, gemma3), eval mode."""
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

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(classes)}")
    config_class, model_class = classes[arch]
    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**values)).eval()
    model.requires_grad_(False)
    return model
