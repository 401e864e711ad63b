"""Publishing: model card, ``dflare push`` / ``push-space`` (validation, dry run, no secrets, nothing
half-uploaded) and loading a pushed-style folder in a clean environment with only torch and transformers.

The Hub cannot be reached from here: uploads are checked against a recording stand-in for ``HfApi``;
what would be uploaded is checked through ``--dry-run``, which stages exactly the upload.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import modeling_dflare  # noqa: F401  (registers the model type; save_pretrained copies the Hub files)
import dflare_cli
from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.testing import make_target, tiny_tokenizer
from modeling_dflare.hub import (
    HUB_FILES,
    REPO_ID_PLACEHOLDER,
    REQUIRED_TAGS,
    check_model_card,
    collect_draft_files,
    collect_space_files,
    load_bench_rows,
    write_model_card,
)
from modeling_dflare.publish_metadata import clean_staged_config, local_paths, strip_local_paths_json

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefgh"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_LICENSE = "apache-2.0"  # the base model's: a card copies it, never assumes one
PUBLISHED = {"config.json", "model.safetensors", "README.md", *HUB_FILES}
TRAINING = {
    "command": "dflare train --target HuggingFaceTB/SmolLM2-135M-Instruct --fusion layerwise --steps 3000",
    "conversations": 4000,
    "steps": 3000,
    "hardware": "2 CPU cores",
    "wall_time": "1 h 50 min",
    "final_position_accuracy": [0.71, 0.52, 0.38],
}
BENCH = {
    "meta": {"hardware": {"processor": "Test CPU", "cpu_count": 2, "torch_threads": 2, "cpu_features": ["avx2", "avx512f"]},
             "date": "2026-12-07T13:23:49+00:00", "device": "cpu", "dtype": "float32",
             "settings": {"num_prompts": 8, "max_new_tokens": 64, "greedy": True}},
    "results": [
        {"dataset": "gsm8k", "method": "plain", "tau": 1.0, "tokens_per_second": 15.9, "speedup": 1.0, "mismatches": 0},
        {"dataset": "gsm8k", "method": "dflare", "tau": 2.613, "tokens_per_second": 21.24, "speedup": 1.336, "mismatches": 0},
    ],
}


# ----------------------------------------------------------------------------------------------
# A tiny target (with a real tokenizer) and a draft for it, saved the way users save them
# ----------------------------------------------------------------------------------------------


def save_tiny_target(folder: Path):
    target = make_target("llama", vocab_size=100, num_hidden_layers=4, max_position_embeddings=512, pad_token_id=0, eos_token_id=1)
    target.generation_config.eos_token_id = None  # run to max_new_tokens: a long output makes equality meaningful
    target.save_pretrained(folder)
    tiny_tokenizer(100).save_pretrained(folder)
    return target


def save_tiny_draft(folder: Path, target, fusion: str = "layerwise") -> DFlareModel:
    torch.manual_seed(1)
    config = DFlareConfig.from_target_config(target.config, num_hidden_layers=2, fusion=fusion, block_size=4)
    draft = DFlareModel(config).eval()
    draft.save_pretrained(folder)
    return draft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"target": dir, "draft": dir, "bench": json}``: a saved tiny target and a draft folder with its card."""
    root = tmp_path_factory.mktemp("hub")
    target = save_tiny_target(root / "target")
    save_tiny_draft(root / "draft", target)
    (root / "bench.json").write_text(json.dumps(BENCH))
    write_model_card(root / "draft", base_model=BASE_MODEL, license=BASE_LICENSE, datasets=["Aeala/ShareGPT_Vicuna_unfiltered"],
                     training=TRAINING, bench_json=str(root / "bench.json"))
    return {"target": root / "target", "draft": root / "draft", "bench": root / "bench.json"}


@pytest.fixture
def draft_copy(models, tmp_path):
    """A private copy of the draft folder that a test may modify."""
    return Path(shutil.copytree(models["draft"], tmp_path / "draft"))


def dry_run(draft_dir: Path, out: Path, *extra: str) -> int:
    return dflare_cli.main(["push", str(draft_dir), "--repo-id", "my-org/tiny-dflare", "--dry-run", str(out), *extra])


def snippet_of(card_text: str) -> str:
    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def test_card_metadata_parses_and_validates(models):
    path = models["draft"] / "README.md"
    front_matter = yaml.safe_load(path.read_text().split("---")[1])
    assert front_matter["library_name"] == "transformers" and front_matter["pipeline_tag"] == "text-generation"
    assert front_matter["base_model"] == BASE_MODEL and front_matter["license"] == "apache-2.0"
    assert front_matter["tags"] == list(REQUIRED_TAGS)
    assert front_matter["datasets"] == ["Aeala/ShareGPT_Vicuna_unfiltered"]
    card = ModelCard.load(path)
    assert card.data.base_model == BASE_MODEL
    assert check_model_card(path) == []
    compile(snippet_of(card.text), "snippet", "exec")  # the usage snippet is valid Python as written


def test_card_shows_recipe_benchmark_and_details(models):
    text = (models["draft"] / "README.md").read_text()
    assert TRAINING["command"] in text and "| wall time | 1 h 50 min |" in text and "0.71, 0.52, 0.38" in text
    assert "| dflare | gsm8k | 2.61 | 21.2 | 1.34x | yes |" in text
    # a result belongs to a machine and a date: the card names both, with what decides CPU timings
    assert "Measured on Test CPU (2 cores, 2 torch threads; avx2 avx512f) on 2026-12-07" in text
    assert "trust_remote_code=True" in text and "assistant_model=draft" in text
    assert "layer-wise fusion" in text and "cannot" in text  # the serving section explains the engines' limit
    assert REPO_ID_PLACEHOLDER in text  # filled by push


def test_card_without_benchmark_or_training_says_so(draft_copy):
    write_model_card(draft_copy, base_model=BASE_MODEL, license=BASE_LICENSE, datasets=[], training={}, repo_id="org/x")
    text = (draft_copy / "README.md").read_text()
    assert "No benchmark has been recorded" in text and "No training record" in text
    assert check_model_card(draft_copy / "README.md") == []


def test_card_of_a_shared_fusion_draft_shows_how_to_serve_it(models, tmp_path):
    target = LlamaForCausalLM.from_pretrained(models["target"])
    save_tiny_draft(tmp_path / "dflash", target, fusion="shared")
    write_model_card(tmp_path / "dflash", base_model=BASE_MODEL, license=BASE_LICENSE, datasets=[], training={}, repo_id="org/tiny-dflash")
    text = (tmp_path / "dflash" / "README.md").read_text()
    assert "A **DFlash** block-diffusion draft" in text
    assert "dflare convert --to zlab-dflash ./draft ./draft-zlab" in text
    assert '"method": "dflash", "model": "./draft-zlab", "num_speculative_tokens": 3' in text
    assert check_model_card(tmp_path / "dflash" / "README.md") == []


def test_bench_reader_is_tolerant_and_counts_what_it_skips(tmp_path, caplog):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"name": "dflash", "task": "mt-bench", "acceptance_length": 2.0, "tokens_per_s": 30, "speedup_vs_plain": 1.5},
                                {"dataset": "x"}]))
    rows, context = load_bench_rows(path)
    assert [(r["method"], r["dataset"], r["acceptance_length"], r["tokens_per_s"], r["speedup"]) for r in rows] == [
        ("dflash", "mt-bench", "2.00", "30.0", "1.50x")
    ]
    assert context == "" and "1 benchmark row(s) without a method skipped" in caplog.text
    path.write_text(json.dumps({"results": [{"dataset": "x"}]}))
    with pytest.raises(ValueError, match="none of its 1 benchmark rows"):
        load_bench_rows(path)


# ----------------------------------------------------------------------------------------------
# dflare push --dry-run
# ----------------------------------------------------------------------------------------------


def test_dry_run_stages_exactly_the_upload_and_no_secret(models, draft_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (draft_copy / "optimizer.pt").write_bytes(b"not for the hub")
    (draft_copy / "checkpoint-100").mkdir()
    (draft_copy / "checkpoint-100" / "model.safetensors").write_bytes(b"x")
    out = tmp_path / "out"
    assert dry_run(draft_copy, out) == 0
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == PUBLISHED
    for name in PUBLISHED - {"README.md"}:
        assert (out / name).read_bytes() == (draft_copy / name).read_bytes(), name
    expected = tmp_path / "expected"
    shutil.copytree(draft_copy, expected)
    write_model_card(expected, base_model=BASE_MODEL, license=BASE_LICENSE, datasets=["Aeala/ShareGPT_Vicuna_unfiltered"],
                     training=TRAINING, bench_json=str(models["bench"]), repo_id="my-org/tiny-dflare")
    card = (out / "README.md").read_text()
    assert card == (expected / "README.md").read_text()  # the template rendered for the pushed repository
    assert 'draft_id = "my-org/tiny-dflare"' in card and REPO_ID_PLACEHOLDER not in card
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_dry_run_refuses_a_non_empty_output_folder(draft_copy, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        dry_run(draft_copy, tmp_path / "out")


def _set_target_name(draft: Path, value) -> None:
    """Record ``value`` as the draft's target, written the way ``save_pretrained`` writes a config."""
    config = json.loads((draft / "config.json").read_text())
    config["target_name_or_path"] = value
    (draft / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def test_dry_run_stages_copies_without_local_paths_and_leaves_the_draft_as_it_was(draft_copy, tmp_path, caplog):
    home = tmp_path / "me"
    target = home / "models" / "gemma-target"
    _set_target_name(draft_copy, str(target))
    summary = {
        "steps": 3,
        "args": {"target": str(target), "data": f"{home}/runs/data-r20,sharegpt", "output_dir": str(home / "runs" / "draft"),
                 "heldout": str(home / "runs" / "heldout.jsonl"), "hidden_cache": None, "init_from": "~/drafts/old", "lr": 0.0006},
        "command": f"dflare train --target {target} --data {home}/runs/data-r20",
        "curve": [{"checkpoint": str(home / "runs" / "draft" / "checkpoint-100"), "tau": 2.5}],
    }
    (draft_copy / "training_summary.json").write_text(json.dumps(summary, indent=2))
    originals = {p.name: p.read_bytes() for p in draft_copy.iterdir() if p.is_file()}
    original_config = json.loads(originals["config.json"])
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="modeling_dflare.publish_metadata"):
        assert dry_run(draft_copy, out) == 0
    # the staged config names the card's base model, everything else as it was, in the same layout
    config_text = (out / "config.json").read_text()
    assert json.loads(config_text)["target_name_or_path"] == BASE_MODEL
    assert config_text == json.dumps(original_config | {"target_name_or_path": BASE_MODEL}, indent=2, sort_keys=True) + "\n"
    assert "target_name_or_path" in caplog.text and BASE_MODEL in caplog.text
    # the staged summary keeps its values, local paths cut to their last component
    summary_text = (out / "training_summary.json").read_text()
    assert local_paths(summary_text) == [] and str(tmp_path) not in summary_text
    assert json.loads(summary_text) == {
        "steps": 3,
        "args": {"target": "gemma-target", "data": "data-r20,sharegpt", "output_dir": "draft", "heldout": "heldout.jsonl",
                 "hidden_cache": None, "init_from": "old", "lr": 0.0006},
        "command": "dflare train --target gemma-target --data data-r20",
        "curve": [{"checkpoint": "checkpoint-100", "tau": 2.5}],
    }
    for path in out.rglob("*"):
        if path.is_file():
            assert str(tmp_path) not in path.read_text(errors="replace"), path
    # the draft folder itself is untouched, byte for byte
    assert {p.name: p.read_bytes() for p in draft_copy.iterdir() if p.is_file()} == originals


def test_dry_run_keeps_a_hub_id_target_name(draft_copy, tmp_path):
    _set_target_name(draft_copy, "HuggingFaceTB/SmolLM2-360M-Instruct")  # another id than the card's base model: kept as it is
    out = tmp_path / "out"
    assert dry_run(draft_copy, out) == 0
    assert (out / "config.json").read_bytes() == (draft_copy / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["target_name_or_path"] == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize(
    "value, base_model, expected",
    [
        ("/srv/models/gemma-target/", None, "gemma-target"),  # no base model known: the last component
        ("~/models/gemma-target", None, "gemma-target"),
        ("C:\\Users\\me\\gemma-target", None, "gemma-target"),
        ("runs/exports/gemma-target", "{base_model_id}", "gemma-target"),  # a placeholder is no Hub id
        ("/srv/models/gemma-target", BASE_MODEL, BASE_MODEL),
        ("google/gemma-3-270m-it", BASE_MODEL, "google/gemma-3-270m-it"),  # a Hub id is kept
        ("gpt2", BASE_MODEL, "gpt2"),  # a bare name is no local path
        (None, BASE_MODEL, None),
    ],
)
def test_staged_config_loses_a_local_target_path(tmp_path, value, base_model, expected):
    path = tmp_path / "config.json"
    text = json.dumps({"model_type": "dflare", "target_name_or_path": value, "vocab_size": 100}, indent=2) + "\n"
    path.write_text(text)
    assert clean_staged_config(path, base_model) is (expected != value)
    assert json.loads(path.read_text()) == {"model_type": "dflare", "target_name_or_path": expected, "vocab_size": 100}
    if expected == value:
        assert path.read_text() == text  # nothing to change: the file is not rewritten


def test_staged_summary_strips_paths_at_any_depth_and_keeps_distinct_keys(tmp_path):
    path = tmp_path / "training_summary.json"
    url = "https://huggingface.co/org/name"  # a URL is no local path
    path.write_text(json.dumps({"a": [{"b": ["/x/y/one.jsonl", 1, None]}], "/p/q/r": 1, "/s/t/r": 2, "url": url}))
    assert strip_local_paths_json(path) == 3
    assert json.loads(path.read_text()) == {"a": [{"b": ["one.jsonl", 1, None]}], "r": 1, "r (2)": 2, "url": url}
    assert strip_local_paths_json(path) == 0


def _drop_auto_map(draft):
    config = json.loads((draft / "config.json").read_text())
    del config["auto_map"]
    (draft / "config.json").write_text(json.dumps(config))


def _add_tensor(draft):
    state = load_file(str(draft / "model.safetensors"))
    state["lm_head.weight"] = torch.zeros(100, 32)
    save_file(state, str(draft / "model.safetensors"))


def _strip_tags(draft):
    text = (draft / "README.md").read_text()
    (draft / "README.md").write_text(re.sub(r"tags:\n(- .*\n)+", "", text))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "modeling_dflare.py").unlink(), "modeling_dflare.py is missing"),
        (_drop_auto_map, "auto_map lacks AutoConfig"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (_add_tensor, r"tensor\(s\) the model does not have: \['lm_head.weight'\]"),
        (lambda d: (d / "README.md").unlink(), "README.md .* is missing"),
        (_strip_tags, "tags lack"),
        (lambda d: (d / "training_summary.json").write_text(json.dumps({"token": FAKE_TOKEN})), "contains your Hugging Face token"),
        (lambda d: (d / "modeling_dflare.py").write_text("import modeling_dflare.data\n"), "clean environment"),
    ],
)
def test_invalid_draft_folder_is_refused_before_anything_is_written(draft_copy, tmp_path, monkeypatch, damage, message):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    damage(draft_copy)
    with pytest.raises(SystemExit, match=message):
        dry_run(draft_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stale_model_code_is_flagged_and_can_be_refreshed(draft_copy, tmp_path, caplog):
    (draft_copy / "modeling_dflare.py").write_text((draft_copy / "modeling_dflare.py").read_text() + "\n# older copy\n")
    assert dry_run(draft_copy, tmp_path / "stale") == 0
    assert "differs from the installed modeling_dflare's copy" in caplog.text
    assert dry_run(draft_copy, tmp_path / "fresh", "--update-code") == 0
    installed = Path(modeling_dflare.__file__).parent / "modeling_dflare.py"
    assert (tmp_path / "fresh" / "modeling_dflare.py").read_bytes() == installed.read_bytes()


# ----------------------------------------------------------------------------------------------
# dflare push: token, offline, upload order
# ----------------------------------------------------------------------------------------------


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records calls and what the uploaded folder held."""

    calls: list = []
    fail_upload = False

    def __init__(self, token=None):
        self.token = token

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": "me"}

    def repo_exists(self, repo_id, repo_type=None):
        self.calls.append(("repo_exists", repo_id))
        return False

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, files, kwargs))
        if self.fail_upload:
            raise OSError("connection reset")

    def delete_repo(self, repo_id, **kwargs):
        self.calls.append(("delete_repo", repo_id))


@pytest.fixture
def hub(monkeypatch):
    RecordingHfApi.calls = []
    RecordingHfApi.fail_upload = False
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(ModelCard, "validate", lambda card, repo_type=None: RecordingHfApi.calls.append(("validate_card", card.data.base_model)))
    return RecordingHfApi


def test_push_offline_fails_before_touching_the_hub(draft_copy, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set.*Nothing was uploaded"):
        dflare_cli.main(["push", str(draft_copy), "--repo-id", "my-org/tiny-dflare"])
    assert hub.calls == []


def test_push_without_token_fails_before_touching_the_hub(draft_copy, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="no Hugging Face token.*Nothing was uploaded"):
        dflare_cli.main(["push", str(draft_copy), "--repo-id", "my-org/tiny-dflare"])
    assert hub.calls == []


def test_push_uploads_the_validated_folder_in_one_commit(draft_copy, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (draft_copy / "notes.txt").write_text("scratch")
    assert dflare_cli.main(["push", str(draft_copy), "--repo-id", "my-org/tiny-dflare", "--private", "--revision", "v1"]) == 0
    assert [c[0] for c in hub.calls] == ["whoami", "validate_card", "repo_exists", "create_repo", "create_branch", "upload_folder"]
    create, upload = hub.calls[3], hub.calls[5]
    assert create[2]["private"] is True and create[2]["repo_type"] == "model"
    assert upload[3]["revision"] == "v1"
    assert set(upload[2]) == PUBLISHED
    assert dry_run(draft_copy, tmp_path / "out") == 0  # the dry run stages the very same bytes
    assert upload[2] == {name: (tmp_path / "out" / name).read_bytes() for name in PUBLISHED}


def test_card_rejected_by_the_hub_stops_before_the_repository_exists(draft_copy, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)

    def reject(card, repo_type=None):
        raise ValueError("license: invalid value")

    monkeypatch.setattr(ModelCard, "validate", reject)
    with pytest.raises(SystemExit, match="rejected the model card metadata: license"):
        dflare_cli.main(["push", str(draft_copy), "--repo-id", "my-org/tiny-dflare"])
    assert [c[0] for c in hub.calls] == ["whoami"]


def test_failed_upload_removes_the_repository_it_created(draft_copy, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub.fail_upload = True
    # the network error reaches the user as one line (the CLI's --debug shows the traceback)
    assert dflare_cli.main(["push", str(draft_copy), "--repo-id", "my-org/tiny-dflare"]) == 2
    assert "connection reset" in capsys.readouterr().err
    assert hub.calls[-1] == ("delete_repo", "my-org/tiny-dflare")
    with pytest.raises(OSError, match="connection reset"):
        dflare_cli.main(["--debug", "push", str(draft_copy), "--repo-id", "my-org/tiny-dflare"])


def test_push_can_write_the_card_itself(draft_copy, tmp_path, models):
    (draft_copy / "README.md").unlink()
    (draft_copy / "training_summary.json").write_text(json.dumps({"steps": 10}))
    out = tmp_path / "out"
    assert dry_run(draft_copy, out, "--base-model", BASE_MODEL, "--license", BASE_LICENSE, "--bench-json", str(models["bench"])) == 0
    card = (out / "README.md").read_text()
    assert "| steps | 10 |" in card and "| dflare | gsm8k |" in card and check_model_card(out / "README.md") == []


# ----------------------------------------------------------------------------------------------
# dflare push-space
# ----------------------------------------------------------------------------------------------

SPACE_README = """---
title: DFlare speculative decoding
emoji: ⚡
sdk: gradio
sdk_version: 5.0.0
app_file: app.py
license: apache-2.0
---

A demo.
"""
SPACE_APP = """import gradio as gr
import torch
from transformers import AutoModel

try:
    import modeling_dflare
except ImportError:
    modeling_dflare = None

gr.Interface(lambda x: x, "text", "text").launch()
"""


@pytest.fixture
def space(tmp_path):
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "README.md").write_text(SPACE_README)
    (folder / "app.py").write_text(SPACE_APP)
    (folder / "requirements.txt").write_text("torch==2.13.0\ntransformers>=5.23,<6  # the model code\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (folder / ".env").write_text("SECRET=1\n")
    return folder


def test_push_space_dry_run_stages_the_space(space, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = tmp_path / "out"
    assert dflare_cli.main(["push-space", str(space), "--repo-id", "my-org/dflare-demo", "--dry-run", str(out)]) == 0
    assert {p.name for p in out.rglob("*") if p.is_file()} == {"README.md", "app.py", "requirements.txt"}


def test_push_space_uploads_as_gradio_space(space, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert dflare_cli.main(["push-space", str(space), "--repo-id", "my-org/dflare-demo"]) == 0
    create = next(c for c in hub.calls if c[0] == "create_repo")
    assert create[2]["repo_type"] == "space" and create[2]["space_sdk"] == "gradio"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "README.md").write_text(SPACE_README.replace("sdk: gradio", "sdk: docker")), "sdk='docker', expected 'gradio'"),
        (lambda s: (s / "README.md").write_text("no front matter\n"), "sdk=None"),
        (lambda s: (s / "requirements.txt").unlink(), "requirements.txt is missing"),
        (lambda s: (s / "app.py").write_text(SPACE_APP + "import numpy\n"), r"imports \['numpy'\]"),
        (lambda s: (s / "app.py").write_text("def broken(:\n"), "app.py does not parse"),
        (lambda s: (s / "config.py").write_text(f"TOKEN = '{FAKE_TOKEN}'\n"), "contains your Hugging Face token"),
    ],
)
def test_invalid_space_is_refused(space, tmp_path, monkeypatch, damage, message):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    damage(space)
    with pytest.raises(SystemExit, match=message):
        dflare_cli.main(["push-space", str(space), "--repo-id", "my-org/dflare-demo", "--dry-run", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (REPO_ROOT / "space" / "README.md").is_file(), reason="the project's Space folder has no README.md yet")
def test_project_space_folder_is_publishable():
    names = {p.relative_to(REPO_ROOT / "space").as_posix() for p in collect_space_files(REPO_ROOT / "space")}
    assert {"app.py", "README.md", "requirements.txt"} <= names


# ----------------------------------------------------------------------------------------------
# Clean environment: only torch and transformers, the model code from the pushed folder
# ----------------------------------------------------------------------------------------------

CLEAN_VENV = Path(os.environ.get("DFLARE_CLEAN_VENV", REPO_ROOT / ".cache" / "clean-venv"))
CLEAN_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, re, sys
    from pathlib import Path

    assert importlib.util.find_spec("modeling_dflare") is None, "modeling_dflare is importable: not a clean environment"
    import torch

    draft_dir, target_dir = sys.argv[1], sys.argv[2]
    snippet = re.search(r"```python\\n(.*?)```", Path(draft_dir, "README.md").read_text(), re.S).group(1)
    snippet, n_target = re.subn(r'^target_id = ".*"$', f"target_id = {target_dir!r}", snippet, flags=re.M)
    snippet, n_draft = re.subn(r'^draft_id = ".*"$', f"draft_id = {draft_dir!r}", snippet, flags=re.M)
    assert n_target == n_draft == 1, "the card's snippet no longer names target_id / draft_id on their own lines"
    namespace = {}
    exec(compile(snippet, "model card usage snippet", "exec"), namespace)  # the card's code, as a user runs it
    target, inputs, output, draft = (namespace[k] for k in ("target", "inputs", "output", "draft"))
    with torch.no_grad():
        plain = target.generate(**inputs, max_new_tokens=128, do_sample=False)
    print(json.dumps({
        "identical": bool(torch.equal(plain, output)),
        "new_tokens": output.shape[1] - inputs["input_ids"].shape[1],
        "cycles": draft.dflare_stats.cycles,
        "draft_module": type(draft).__module__,
        "modules": sorted(m for m in sys.modules if m.split(".")[0] == "modeling_dflare"),
    }))
    """
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    return env


def ensure_clean_venv() -> Path:
    """A venv with only torch and transformers (and their dependencies), built once and reused.

    Same versions as this environment, so the test checks the code, not a version drift. A stamp file
    records what was installed; a venv without a matching stamp (interrupted build, other versions) is
    rebuilt. A lock keeps concurrent test runs from building it twice.
    """
    versions = {"python": "%d.%d" % sys.version_info[:2], "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    python, stamp = CLEAN_VENV / "bin" / "python", CLEAN_VENV / "dflare-clean-venv.json"
    CLEAN_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(CLEAN_VENV.parent / "clean-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.is_file() and json.loads(stamp.read_text()) == versions:
            return python
        shutil.rmtree(CLEAN_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(CLEAN_VENV)], check=True, env=_clean_env())
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"torch=={versions['torch']}", f"transformers=={versions['transformers']}"],
            env=_clean_env(), capture_output=True, text=True, timeout=1500,
        )
        if install.returncode:
            raise RuntimeError(f"could not build the clean venv at {CLEAN_VENV}:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
        stamp.write_text(json.dumps(versions))
    return python


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pushed_folder_loads_and_generates_losslessly_in_a_clean_environment(models, tmp_path):
    out = tmp_path / "pushed"
    assert dry_run(models["draft"], out) == 0
    python = ensure_clean_venv()
    script = tmp_path / "load_from_card.py"
    script.write_text(CLEAN_SCRIPT)
    env = _clean_env() | {"HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([str(python), str(script), str(out), str(models["target"])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"], report
    assert report["new_tokens"] == 128 and report["cycles"] > 0, report
    assert report["draft_module"].startswith("transformers_modules."), report  # code came from the folder
    assert report["modules"] == [], report


# ----------------------------------------------------------------------------------------------
# The project's shipped drafts (present once training has produced them)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2-dflare", "smollm2-dflash"])
def test_shipped_draft_is_publishable(name, tmp_path):
    folder = REPO_ROOT / "drafts" / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"drafts/{name} has not been trained and committed yet")
    if not (folder / "README.md").is_file():
        pytest.skip(f"drafts/{name} has no model card yet (training writes it with modeling_dflare.hub.write_model_card)")
    names = {p.name for p in collect_draft_files(folder)}
    assert PUBLISHED <= names
    if json.loads((folder / "config.json").read_text()).get("fusion") == "shared":
        from modeling_dflare.convert import export_zlab_dflash

        export_zlab_dflash(folder, tmp_path / "zlab", drop_draft_vocab=True)
        assert (tmp_path / "zlab" / "model.safetensors").is_file()


def test_card_rows_name_a_sampled_rows_temperature_and_claim_no_losslessness_for_it(tmp_path):
    """``dflare bench --temperatures``: a sampled row's dataset cell names its temperature, and it has
    no lossless cell (sampled texts are not compared with plain decoding token by token)."""
    rows = [
        {"dataset": "mtbench", "method": "dflare", "temperature": 0.0, "tau": 2.5, "speedup": 1.6, "mismatches": 0},
        {"dataset": "mtbench", "method": "dflare", "temperature": 0.7, "tau": 2.1, "speedup": 1.3, "mismatches": 0},
    ]
    meta = {"settings": {"num_prompts": 8, "max_new_tokens": 128, "greedy": False, "temperatures": [0.0, 0.7]}}
    (tmp_path / "bench.json").write_text(json.dumps({"meta": meta, "results": rows}))
    cells, context = load_bench_rows(tmp_path / "bench.json")
    assert [(c["dataset"], c["lossless"]) for c in cells] == [("mtbench", "yes"), ("mtbench (T=0.7)", "–")]
    assert "greedy decoding and sampling at temperature 0.7" in context
