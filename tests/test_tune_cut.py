"""``dflare tune-cut``: re-choosing a trained draft's confidence cut for the machine it runs on."""

import dataclasses
import json

import pytest
import torch

from modeling_dflare import DFlareConfig
from modeling_dflare.data import write_jsonl
from modeling_dflare.testing import tiny_target, tiny_tokenizer
from modeling_dflare.training import TrainArgs, train
from modeling_dflare.training.tune import tune_cut


def test_tune_cut_rewrites_the_cut_and_says_so(trained_draft, tmp_path):
    import shutil

    source, target, tokenizer, heldout = trained_draft
    draft = tmp_path / "draft"
    shutil.copytree(source, draft)
    config_before = json.loads((draft / "config.json").read_text())
    trained_pick = json.loads((draft / "training_summary.json").read_text())["threshold_tuning"]["best"]
    threads_before = torch.get_num_threads()

    dry = tune_cut(draft, str(heldout), target=target, tokenizer=tokenizer, threads=1, write=False)
    assert json.loads((draft / "config.json").read_text()) == config_before  # a dry run writes nothing
    tuning = tune_cut(draft, str(heldout), target=target, tokenizer=tokenizer, threads=1)

    assert torch.get_num_threads() == threads_before  # the timing threads are put back
    assert tuning["threads"] == 1 and tuning["heldout_answers"] == 4 and set(dry["predicted_speedup"]) == set(tuning["predicted_speedup"])
    assert tuning["predicted_speedup"][str(tuning["best"])] == max(tuning["predicted_speedup"].values())
    config_after = json.loads((draft / "config.json").read_text())
    assert config_after.pop("confidence_threshold") == tuning["best"] == DFlareConfig.from_pretrained(draft).confidence_threshold
    config_before.pop("confidence_threshold")
    assert config_after == config_before  # nothing else in the config changed
    summary = json.loads((draft / "training_summary.json").read_text())
    assert summary["threshold_tuning"]["best"] == tuning["best"]
    assert summary["threshold_tuning"]["previous"]["best"] == trained_pick
    card = (draft / "README.md").read_text()
    assert "dflare tune-cut" in card and f"the training run had picked {trained_pick}" in card


def _hybrid_copy(source, draft):
    """A copy of the trained draft folder with the prompt-lookup hybrid on (longest n-gram 3)."""
    import shutil

    shutil.copytree(source, draft)
    config = json.loads((draft / "config.json").read_text())
    config["prompt_lookup_ngram"] = 3
    (draft / "config.json").write_text(json.dumps(config))
    return draft


def test_tune_cut_chooses_the_hybrid_settings_with_the_cut(trained_draft, tmp_path):
    """A draft shipped with the prompt-lookup hybrid on gets its cut, lookup confidence and shortest
    n-gram chosen together, all three written to config.json and named in the card."""
    source, target, tokenizer, heldout = trained_draft
    draft = _hybrid_copy(source, tmp_path / "draft")
    tuning = tune_cut(draft, str(heldout), target=target, tokenizer=tokenizer, threads=1)
    hybrid = tuning["hybrid"]
    assert hybrid["predicted"] == max(hybrid["predicted_speedup"].values())
    assert tuning["best"] == hybrid["best"]["confidence_threshold"]
    written = DFlareConfig.from_pretrained(draft)
    assert (written.confidence_threshold, written.prompt_lookup_confidence, written.prompt_lookup_min_ngram) == (
        hybrid["best"]["confidence_threshold"], hybrid["best"]["prompt_lookup_confidence"], hybrid["best"]["prompt_lookup_min_ngram"]
    )
    assert written.prompt_lookup_ngram == hybrid["best"]["prompt_lookup_ngram"]  # the longest n-gram is tuned too
    assert written.prompt_lookup_min_ngram <= written.prompt_lookup_ngram
    card = (draft / "README.md").read_text()
    assert f"lookup confidence {hybrid['best']['prompt_lookup_confidence']}" in card


def test_tune_cut_pools_several_heldout_sources_and_predicts_each(trained_draft, tmp_path):
    """Comma-separated held-out folders (chat, code, math...) are pooled for the choice; the card and
    the record give each source's own prediction at the chosen settings, which the pooled prediction
    lies between (both are tokens over seconds of the same cost model)."""
    source, target, tokenizer, heldout = trained_draft
    draft = _hybrid_copy(source, tmp_path / "draft")
    other = tmp_path / "code" / "heldout"
    other.mkdir(parents=True)
    write_jsonl(other / "answers.jsonl", [
        {"id": f"k{i}", "messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                                     {"role": "assistant", "content": " ".join(f"w{(j * 5) % 31}" for j in range(30))}]}
        for i in range(3)
    ])
    sources = f"{heldout},{other / 'answers.jsonl'}"
    tuning = tune_cut(draft, sources, target=target, tokenizer=tokenizer, threads=1)
    by_source = tuning["by_source"]
    assert list(by_source) == [str(heldout), str(other / "answers.jsonl")]
    assert [entry["answers"] for entry in by_source.values()] == [4, 3] and tuning["heldout_answers"] == 7
    low, high = sorted(entry["predicted_speedup"] for entry in by_source.values())
    assert low - 1e-3 <= tuning["hybrid"]["predicted"] <= high + 1e-3
    card = (draft / "README.md").read_text()
    assert "predicted speedup by held-out source" in card and f"heldout.jsonl: {by_source[str(heldout)]['predicted_speedup']}x (4 answers)" in card
    alone = tune_cut(draft, str(heldout), target=target, tokenizer=tokenizer, threads=1, write=False)
    assert "by_source" not in alone and alone["heldout_answers"] == 4
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        tune_cut(draft, f"{heldout},{tmp_path / 'missing'}", target=target, tokenizer=tokenizer, threads=1)


def test_tune_cut_names_what_is_wrong(trained_draft, tmp_path):
    source, target, tokenizer, heldout = trained_draft
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tune_cut(tmp_path, str(heldout), target=target, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.jsonl.*does not exist"):
        tune_cut(source, str(tmp_path / "missing.jsonl"), target=target, tokenizer=tokenizer)
    write_jsonl(tmp_path / "empty.jsonl", [{"id": "x", "messages": [{"role": "user", "content": "w1"}]}])
    with pytest.raises(ValueError, match="empty.jsonl.*no usable answer"):
        tune_cut(source, str(tmp_path / "empty.jsonl"), target=target, tokenizer=tokenizer)
    other = tiny_target("llama", hidden_size=48)
    with pytest.raises(ValueError, match="does not match the target"):
        tune_cut(source, str(heldout), target=other, tokenizer=tokenizer)


def test_training_with_fewer_threads_than_cores_points_to_tune_cut(trained_draft, tmp_path, monkeypatch, caplog):
    """OMP_NUM_THREADS=1 (two jobs sharing the cores) makes the run's own tuner time one thread, and
    --threads below the generation threads means another job shares the cores while the run times
    the cut: the run says so and names the command that re-chooses the cut."""
    import os

    heldout = trained_draft[3]
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(heldout.with_name("train.jsonl")), heldout=str(heldout),
                     num_hidden_layers=1, block_size=4, num_anchors=4, max_steps=2, batch_size=2, eval_every=1000, lr=1e-3,
                     draft_vocab_size=None, consistency_prompts=1, tune_threshold=True)
    with caplog.at_level("WARNING", logger="modeling_dflare.training.loop"):
        train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    assert f"dflare tune-cut {tmp_path / 'draft'}" in caplog.text and "this machine has 64" in caplog.text
    caplog.clear()
    monkeypatch.delenv("OMP_NUM_THREADS")  # torch's own default: nothing to say
    with caplog.at_level("WARNING", logger="modeling_dflare.training.loop"):
        train(dataclasses.replace(args, output_dir=str(tmp_path / "draft2")), target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    assert "tune-cut" not in caplog.text
    caplog.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what generate would run with; training limited to one beside another job
    try:
        with caplog.at_level("WARNING", logger="modeling_dflare.training.loop"):
            train(dataclasses.replace(args, output_dir=str(tmp_path / "draft3"), threads=1), target=tiny_target("llama"),
                  tokenizer=tiny_tokenizer())
    finally:
        torch.set_num_threads(threads)
    assert "training ran with --threads 1" in caplog.text and f"dflare tune-cut {tmp_path / 'draft3'}" in caplog.text

