"""The training recipe's audit: each known tau-killer has a test, the feature cache is really read
back, and what training measures agrees with what ``generate`` measures.

Known bugs that silently cut acceptance in other ports, and where each is checked:

* layer offset (the output of layer i is ``hidden_states[i + 1]``): ``test_features_are_the_named_layers``;
* context not strictly before the anchor: ``test_block_mask_matches_brute_force`` (test_training.py)
  and ``test_context_strictly_before_anchor`` here (a change after the anchor changes nothing);
* label off-by-one: ``test_labels_are_the_tokens_after_the_anchor``;
* an untied head where the target ties its embeddings: ``test_draft_uses_the_targets_own_head``;
* train/inference disagreement (mask, positions, layers): ``test_training_pass_equals_inference_pass``
  (test_training.py) and the end-to-end ``test_implied_acceptance_matches_generate``.
"""

import logging
import random

import pytest
import torch

from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.anchors import block_inputs, position_weights
from modeling_dflare.data import write_jsonl
from modeling_dflare.testing import tiny_target, tiny_tokenizer
from modeling_dflare.training import Sequence, TargetFeatures, TrainArgs, TrainingInputError, block_loss, train
from modeling_dflare.training.consistency import leading_runs, walk


def test_features_are_the_named_layers():
    """Feature slot j holds the output of target layer ``target_layer_ids[j]`` (a forward hook's view)."""
    target = tiny_target("llama", num_hidden_layers=4)
    ids = torch.randint(8, 90, (1, 12))
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(target.model.layers)
    ]
    try:
        features = TargetFeatures(target).compute(ids, [0, 1, 2])
    finally:
        for hook in hooks:
            hook.remove()
    width = target.config.hidden_size
    # (the last layer is left out: transformers reports it after the final norm, at inference too)
    for slot, layer in enumerate([0, 1, 2]):
        torch.testing.assert_close(features.hidden[0, :, slot * width : (slot + 1) * width], captured[layer][0])


def test_labels_are_the_tokens_after_the_anchor():
    ids = torch.arange(50, 80)
    tokens, positions, labels = block_inputs(ids, torch.tensor([4, 20]), 4, mask_token_id=0)
    assert tokens.tolist() == [54, 0, 0, 0, 70, 0, 0, 0]
    assert positions.tolist() == [4, 5, 6, 7, 20, 21, 22, 23]
    assert labels.tolist() == [-100, 55, 56, 57, -100, 71, 72, 73]


def test_context_strictly_before_anchor():
    """Changing the context at or after an anchor leaves that block's output unchanged."""
    torch.manual_seed(0)
    target = tiny_target("qwen3")
    draft = DFlareModel(DFlareConfig.from_target_config(target.config, num_hidden_layers=1, block_size=4)).eval()
    sequence = Sequence("s", torch.randint(8, 90, (20,)), 4)
    features = TargetFeatures(target)(sequence, draft.config.target_layer_ids)
    weights = position_weights(4, 3.0)
    head = target.get_output_embeddings().weight
    anchor = torch.tensor([10])
    before = block_loss(draft, target.get_input_embeddings(), head, None, sequence, features, anchor, weights, "data")
    features.hidden[:, 10:] = torch.randn_like(features.hidden[:, 10:])
    after = block_loss(draft, target.get_input_embeddings(), head, None, sequence, features, anchor, weights, "data")
    assert torch.equal(before.correct, after.correct) and before.loss.item() == pytest.approx(after.loss.item(), abs=1e-5)
    features.hidden[:, 9] += 1.0  # the position just before the anchor is context: it must matter
    moved = block_loss(draft, target.get_input_embeddings(), head, None, sequence, features, anchor, weights, "data")
    assert moved.loss.item() != pytest.approx(before.loss.item(), abs=1e-6)


def test_fill_equals_one_sequence_at_a_time(tmp_path):
    """Batched, right-padded feature computation gives each sequence what its own forward gives."""
    target = tiny_target("llama")
    rng = torch.Generator().manual_seed(0)
    sequences = [Sequence(f"s{i}", torch.randint(8, 90, (n,), generator=rng), 3) for i, n in enumerate([9, 17, 17, 30, 12])]
    layers = [0, 1, 3]
    features = TargetFeatures(target, tmp_path / "cache", storage="bf16")
    stats = features.fill(sequences, layers, batch_tokens=64)
    assert stats["computed"] == 5 and features.fill(sequences, layers)["computed"] == 0
    alone = TargetFeatures(target)
    for sequence in sequences:
        cached = features(sequence, layers)
        direct = alone(sequence, layers)
        torch.testing.assert_close(cached.hidden, direct.hidden, atol=2e-2, rtol=2e-2)  # the cache stores bf16
        assert torch.equal(cached.predictions, direct.predictions)
    assert features.loaded == 5


def _greedy_dataset(folder, target, tokenizer, count: int, start: int, new_tokens: int = 24):
    """Conversations whose answers are the tiny target's own greedy continuations (regenerated data)."""
    rng = random.Random(start)
    records = []
    for i in range(start, start + count):
        prompt = " ".join(f"w{rng.randrange(88)}" for _ in range(6))
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, bad_words_ids=[[t] for t in range(8)])
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        records.append({"id": f"g{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return records


def _tiny_run(tmp_path, target, train_count: int, heldout_count: int, **overrides) -> dict:
    """TrainArgs fields of a tiny run on freshly regenerated data (``train.jsonl``, ``heldout.jsonl``)."""
    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", _greedy_dataset(tmp_path, target, tokenizer, train_count, 0))
    write_jsonl(tmp_path / "heldout.jsonl", _greedy_dataset(tmp_path, target, tokenizer, heldout_count, 100))
    fields = dict(
        output_dir=str(tmp_path / "draft"), data=str(tmp_path / "train.jsonl"), heldout=str(tmp_path / "heldout.jsonl"),
        num_hidden_layers=1, block_size=4, epochs=1, batch_size=2, save_every=100, eval_every=100, lr=3e-3,
        draft_vocab_size=None, consistency_prompts=0,
    )
    return {**fields, **overrides}


def _count_target_rows(monkeypatch) -> dict:
    """``{"n": sequences the target has run on}``, counted from now on through ``TargetFeatures.compute``."""
    rows, original = {"n": 0}, TargetFeatures.compute

    def counting(self, input_ids, layer_ids, attention_mask=None):
        rows["n"] += input_ids.shape[0]
        return original(self, input_ids, layer_ids, attention_mask)

    monkeypatch.setattr(TargetFeatures, "compute", counting)
    return rows


@pytest.fixture(scope="module")
def looping_target():
    # a larger init makes the tiny target's greedy answers loop, which a draft can learn in a few steps
    return tiny_target("llama", initializer_range=0.15, seed=0)


def test_multi_epoch_run_reads_the_cache_back(tmp_path, looping_target, monkeypatch):
    """Three epochs over a cached dataset run the target once per sequence, never again."""
    args = TrainArgs(**_tiny_run(tmp_path, looping_target, 12, 3, epochs=3, eval_every=4, hidden_cache=str(tmp_path / "cache")))
    rows = _count_target_rows(monkeypatch)
    out = train(args, target=looping_target, tokenizer=tiny_tokenizer())
    import json

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["epochs"] >= 3 and summary["train_sequences"] >= 10 and summary["heldout_sequences"] >= 2
    # every training and held-out sequence ran through the target once (in the up-front fill), never again
    assert rows["n"] == summary["train_sequences"] + summary["heldout_sequences"]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == rows["n"]
    assert all("h_fp8" in torch.load(f, weights_only=True) for f in (tmp_path / "cache").glob("*.pt"))  # the default storage


def test_features_only_fills_the_cache_that_a_later_run_trains_from(tmp_path, looping_target, monkeypatch):
    """``--features-only`` writes every sequence's features and stops (no draft, no work folder); the
    training run after it reads them all back and runs the target on nothing."""
    tokenizer = tiny_tokenizer()
    common = _tiny_run(tmp_path, looping_target, 6, 2)
    rows = _count_target_rows(monkeypatch)
    with pytest.raises(TrainingInputError, match="--hidden-cache"):
        train(TrainArgs(**common, features_only=True), target=looping_target, tokenizer=tokenizer)
    cache = tmp_path / "cache"
    assert train(TrainArgs(**common, hidden_cache=str(cache), features_only=True), target=looping_target, tokenizer=tokenizer) is None
    filled = rows["n"]
    assert filled >= 6 and len(list(cache.glob("*.pt"))) == filled
    assert not (tmp_path / "draft").exists() and not (tmp_path / "draft-work").exists()
    out = train(TrainArgs(**common, hidden_cache=str(cache)), target=looping_target, tokenizer=tokenizer)
    assert (out / "model.safetensors").is_file()
    assert rows["n"] == filled  # the training run computed no target features


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("layer_ids", [[0, 1], [1, 3]], ids=["layers-to-run", "last-layer-cached"])
def test_teacher_rebuilds_the_target_logits_from_the_features(arch, layer_ids):
    """``--distill``'s teacher: the target's logits over the draft vocabulary, rebuilt from the
    features alone (the remaining layers, the final norm, the head rows), equal a full forward's;
    where the layers cannot run the Llama way (Gemma 3) it refuses, naming --distill."""
    from modeling_dflare.training.distill import TeacherHead

    target = tiny_target(arch, num_hidden_layers=4)
    ids = torch.randint(8, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    features = TargetFeatures(target).compute(ids, layer_ids)
    vocab = torch.tensor([5, 9, 40, 41, 77])  # a reduced draft vocabulary
    teacher = TeacherHead(target, layer_ids, target.get_output_embeddings().weight.detach()[vocab])
    positions = torch.tensor([0, 7, 19])
    if arch == "gemma3" and layer_ids == [0, 1]:
        with pytest.raises(ValueError, match="--distill cannot run the target's decoder layers 2-3"):
            teacher.logits(features, positions)
        return
    with torch.no_grad():
        expected = target(ids).logits[0, positions][:, vocab]
    torch.testing.assert_close(teacher.logits(features, positions), expected, rtol=1e-4, atol=1e-5)
    full = TeacherHead(target, layer_ids, target.get_output_embeddings().weight.detach())
    assert full.agreement(features) == 1.0  # the target's own greedy token at every position
    wrong = TeacherHead(target, layer_ids, torch.randn_like(target.get_output_embeddings().weight))
    assert wrong.agreement(features) < 0.5  # the check can fail


def test_distill_mixes_the_target_distribution_into_the_training_loss(tmp_path, looping_target):
    """A --distill run checks its teacher, trains on a different loss than greedy labels alone, and
    evaluates with the greedy-label loss (comparable across runs); a weight outside [0, 1] is refused."""
    import json

    tokenizer = tiny_tokenizer()
    common = _tiny_run(tmp_path, looping_target, 6, 2, max_steps=3, eval_every=3, hidden_cache=str(tmp_path / "cache"))
    del common["output_dir"]
    with pytest.raises(TrainingInputError, match="--distill 1.5: expected a weight from 0"):
        train(TrainArgs(output_dir=str(tmp_path / "bad"), distill=1.5, **common), target=looping_target, tokenizer=tokenizer)
    summaries = {}
    for alpha in (0.0, 0.5):
        out = train(TrainArgs(output_dir=str(tmp_path / f"d{alpha}"), distill=alpha, **common), target=looping_target, tokenizer=tokenizer)
        summaries[alpha] = json.loads((out / "training_summary.json").read_text())
    assert summaries[0.5]["args"]["distill"] == 0.5
    # the same data, anchors and first step: the training loss differs only by the soft term
    assert summaries[0.5]["final_train_loss"] != pytest.approx(summaries[0.0]["final_train_loss"], abs=1e-4)
    assert "--distill: the rebuilt target logits" in (tmp_path / "d0.5-work" / "train.log").read_text()


def test_implied_acceptance_matches_generate(tmp_path, looping_target):
    """On answers the target itself produced greedily, walking the held-out correctness table the way
    generation walks it predicts ``generate``'s acceptance length exactly (same model, same numbers);
    the summary and the card carry both."""
    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 24, 0, 40))
    write_jsonl(tmp_path / "heldout.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 4, 100, 40))
    args = TrainArgs(
        output_dir=str(tmp_path / "draft"), data=str(tmp_path / "train.jsonl"), heldout=str(tmp_path / "heldout.jsonl"),
        num_hidden_layers=1, block_size=4, epochs=8, batch_size=2, save_every=1000, eval_every=40, lr=3e-3,
        draft_vocab_size=None, consistency_prompts=4, target_precision="fp32",  # generate runs the fp32 target
        tune_threshold=True,
    )
    out = train(args, target=looping_target, tokenizer=tokenizer)
    import json

    summary = json.loads((out / "training_summary.json").read_text())
    consistency = summary["consistency"]
    assert consistency["prompts"] >= 3
    assert consistency["generate_tau"] > 1.2, consistency  # the draft learned something: the check is not vacuous
    assert consistency["walk_ratio"] == pytest.approx(1.0, abs=0.05), consistency
    card = (out / "README.md").read_text()
    assert str(consistency["generate_tau"]) in card and str(consistency["implied_tau"]) in card
    # the learning curve has a point per evaluation and one at the end, each with implied and walked acceptance
    curve = summary["curve"]
    assert [p["step"] for p in curve] == [40, 80, 96] and all(p["walk_tau"] >= 1.0 and p["tau"] >= 1.0 for p in curve)
    assert curve[0]["cpu_hours"] < curve[1]["cpu_hours"] < curve[2]["cpu_hours"]
    # the confidence cut was chosen by the cost model, and the saved draft carries it
    tuning = summary["threshold_tuning"]
    assert set(tuning["predicted_speedup"]) >= {"0.0", "0.3"} and len(tuning["verify_ms"]) == 4
    assert tuning["predicted_speedup"][str(tuning["best"])] == max(tuning["predicted_speedup"].values())
    assert DFlareConfig.from_pretrained(out).confidence_threshold == tuning["best"]


def test_cost_model_prefers_the_cut_when_drafts_are_wrong_and_expensive():
    from modeling_dflare.training.consistency import choose_threshold, cut_lengths

    confidence = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.5, 0.5]])
    assert cut_lengths(confidence, 0.5).tolist() == [2, 0] and cut_lengths(confidence, 0.0).tolist() == [3, 3]
    # drafts never right, verifying extra tokens costly: proposing nothing is fastest
    never = [(torch.zeros(20, dtype=torch.long), torch.full((20, 3), 0.4), 19)]
    costly = [0.010, 0.020, 0.030, 0.040]
    result = choose_threshold(never, costly, 0.001, thresholds=(0.0, 0.5))
    assert result["best"] == 0.5 and result["predicted_speedup"]["0.0"] < result["predicted_speedup"]["0.5"]
    # drafts always right and verify free of charge: proposing everything is fastest
    always = [(torch.full((20,), 3), torch.full((20, 3), 0.4), 19)]
    flat = [0.010, 0.010, 0.010, 0.010]
    assert choose_threshold(always, flat, 0.001, thresholds=(0.0, 0.5))["best"] == 0.0


def test_cost_model_gives_way_to_a_lookup_that_is_right():
    """Drafts never right but confident, a looping answer whose lookup continuation always is: the
    hybrid's choice replaces every draft (lookup confidence above the drafts' own), and predicts more
    than the draft alone; ``tuned_settings`` hands all three values to the config."""
    from modeling_dflare.training.consistency import LOOKUP_NGRAMS, LookupTable, choose_threshold, tuned_settings

    ids = torch.tensor([5, 6, 7, 8] * 12)
    table = LookupTable(ids, 8, max_ngram=3, width=3)
    assert table(0, 0, 2) == (3, 3)  # after "... 7 8 5": "6 7 8" follows, and the answer goes on with it
    walks = [(torch.zeros(39, dtype=torch.long), torch.full((39, 3), 0.6), 38, table)]
    result = choose_threshold(walks, [0.010, 0.011, 0.012, 0.013], 0.001, thresholds=(0.0, 0.5), lookup_confidences=(0.3, 0.9))
    hybrid = result["hybrid"]
    assert hybrid["best"]["prompt_lookup_confidence"] == 0.9  # 0.6 ** 1 < 0.9: no draft is "sure"
    assert hybrid["predicted"] > max(result["predicted_speedup"].values())
    assert tuned_settings(result) == hybrid["best"] and tuned_settings({"best": 0.2}) == {"confidence_threshold": 0.2}
    assert hybrid["best"]["prompt_lookup_ngram"] in LOOKUP_NGRAMS  # the longest n-gram is chosen too
    assert {key.rsplit("max n-gram ", 1)[1] for key in hybrid["predicted_speedup"]} == {str(m) for m in LOOKUP_NGRAMS}
    own = choose_threshold(walks, [0.010, 0.011, 0.012, 0.013], 0.001, thresholds=(0.0,), lookup_confidences=(0.9,), max_ngrams=None)
    assert own["hybrid"]["best"]["prompt_lookup_ngram"] == 3  # None: only the tables' own


def test_monotone_fit_smooths_noisy_forward_times():
    from modeling_dflare.training.consistency import monotone_fit

    noisy = [0.056, 0.095, 0.116, 0.081, 0.073, 0.080, 0.106, 0.086]
    fitted = monotone_fit(noisy)
    assert all(b >= a for a, b in zip(fitted, fitted[1:]))
    assert fitted[0] == 0.056  # the one-token step (matrix-vector kernels) is kept, not averaged away
    assert sum(fitted[1:]) == pytest.approx(sum(noisy[1:]))
    assert monotone_fit([0.06, 0.05, 0.04, 0.03]) == pytest.approx([0.04] * 4)  # never decreasing


def test_walk_follows_generation():
    runs = torch.tensor([2, 0, 0, 1, 0, 3, 0, 0, 0, 0])
    # cycle at 0 gains 3 -> position 3 gains 2 -> position 5 gains 4 -> position 9 gains 1
    assert walk(runs, 100) == (10, 4)
    assert walk(runs, 4) == (4, 2)  # the budget cuts the second cycle
    correct = torch.tensor([[True, True, False], [False, True, True], [True, True, True]])
    assert leading_runs(correct).tolist() == [2, 0, 3]


def test_no_heldout_sequences_warns(tmp_path, caplog, looping_target):
    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 4, 0, 12))
    write_jsonl(tmp_path / "heldout.jsonl", [])
    args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(tmp_path / "train.jsonl"), heldout=str(tmp_path / "heldout.jsonl"),
                     num_hidden_layers=1, block_size=4, max_steps=2, batch_size=1, draft_vocab_size=None)
    with caplog.at_level(logging.WARNING, logger="modeling_dflare"):
        train(args, target=looping_target, tokenizer=tokenizer)
    assert any("no held-out sequences" in r.getMessage() for r in caplog.records)


def test_init_from_keeps_this_runs_block_size_and_cut_and_else_its_parents(tmp_path, looping_target):
    import json

    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 4, 0, 12))
    common = dict(data=str(tmp_path / "train.jsonl"), num_hidden_layers=1, max_steps=2, batch_size=1, draft_vocab_size=None)
    first = train(TrainArgs(output_dir=str(tmp_path / "a"), block_size=8, **common), target=looping_target, tokenizer=tokenizer)
    second = train(
        TrainArgs(output_dir=str(tmp_path / "b"), block_size=4, init_from=str(first), confidence_threshold=0.25, **common),
        target=looping_target, tokenizer=tokenizer,
    )
    config = DFlareConfig.from_pretrained(second)
    assert config.block_size == 4 and config.confidence_threshold == 0.25
    # Without the two flags, a warm start trains and saves at its parent's block size and cut
    # (a fresh draft's default of 16 would silently retrain a block-4 draft at 16).
    third = train(TrainArgs(output_dir=str(tmp_path / "c"), init_from=str(second), **common), target=looping_target, tokenizer=tokenizer)
    config = DFlareConfig.from_pretrained(third)
    assert config.block_size == 4 and config.confidence_threshold == 0.25
    assert json.loads((third / "training_summary.json").read_text())["block_size"] == 4
    fresh = train(TrainArgs(output_dir=str(tmp_path / "d"), **common), target=looping_target, tokenizer=tokenizer)
    assert (DFlareConfig.from_pretrained(fresh).block_size, DFlareConfig.from_pretrained(fresh).confidence_threshold) == (16, 0.0)

    summary = json.loads((second / "training_summary.json").read_text())
    cumulative = summary["cumulative"]
    assert cumulative["runs"] == 2 and cumulative["steps"] == 4
    assert summary["prompt_sources"] == {"other": 4} and cumulative["prompt_sources"] == ["other"]
    assert "ShareGPT" not in (second / "README.md").read_text()  # the user's own data is not credited to ShareGPT


def test_balanced_draft_vocabulary_weighs_each_prompt_source_equally():
    """A small code set's tokens enter the vocabulary beside a chat set many times its size."""
    from modeling_dflare.training.sequences import choose_draft_vocab

    chat = [Sequence(f"chat{i}", torch.tensor([1, 1] + [5] * 50 + [6] * 40), 2) for i in range(10)]
    code = [Sequence("codeio/codeio-hq/1", torch.tensor([1, 1] + [9] * 5), 2)]
    assert choose_draft_vocab(chat + code, 3, 12, always=[0]).tolist() == [0, 5, 6]
    assert choose_draft_vocab(chat + code, 3, 12, always=[0], balanced=True).tolist() == [0, 9, 5]


def test_draft_vocab_data_rechooses_a_warm_started_drafts_vocabulary(tmp_path, looping_target):
    """``--draft-vocab-data`` replaces the parent's vocabulary (same size) by one its answers choose, each
    prompt source weighed equally, held-out prompts left out; without it the parent's vocabulary stays."""
    tokenizer = tiny_tokenizer()
    records = _greedy_dataset(tmp_path, looping_target, tokenizer, 4, 0, 12)
    write_jsonl(tmp_path / "train.jsonl", records)
    code = [{"id": f"codeio/t/{i}", "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w80 w81 w82 w83"}]}
            for i in range(2)]
    held = [{"id": "h1", "messages": [{"role": "user", "content": "w2"}, {"role": "assistant", "content": "w84 w85 w86 w87"}]}]
    write_jsonl(tmp_path / "code.jsonl", code)
    write_jsonl(tmp_path / "held.jsonl", held)
    common = dict(data=str(tmp_path / "train.jsonl"), num_hidden_layers=1, max_steps=1, batch_size=1, block_size=4, consistency_prompts=0)
    first = train(TrainArgs(output_dir=str(tmp_path / "a"), draft_vocab_size=12, **common), target=looping_target, tokenizer=tokenizer)
    kept = train(TrainArgs(output_dir=str(tmp_path / "b"), init_from=str(first), **common), target=looping_target, tokenizer=tokenizer)
    vocab_data = f"{tmp_path / 'code.jsonl'},{tmp_path / 'held.jsonl'}"
    chosen = train(
        TrainArgs(output_dir=str(tmp_path / "c"), init_from=str(first), draft_vocab_data=vocab_data, heldout=str(tmp_path / "held.jsonl"),
                  **common),
        target=looping_target, tokenizer=tokenizer,
    )
    ids = {name: DFlareModel.from_pretrained(path).draft_vocab_ids.tolist() for name, path in (("a", first), ("b", kept), ("c", chosen))}
    assert ids["b"] == ids["a"] and len(ids["c"]) == 12
    code_tokens = set(tokenizer("w80 w81 w82 w83")["input_ids"])
    held_tokens = set(tokenizer("w84 w85 w86 w87")["input_ids"]) - code_tokens
    assert code_tokens <= set(ids["c"]) and not code_tokens <= set(ids["a"])
    assert not held_tokens & set(ids["c"])  # the held-out answer chose nothing
    from modeling_dflare.training.sequences import vocab_sequences

    args = TrainArgs(output_dir="unused", draft_vocab_data=vocab_data)
    assert [s.id for s in vocab_sequences(args, tokenizer, [])] == ["codeio/t/0", "codeio/t/1", "h1"]
    assert [s.id for s in vocab_sequences(args, tokenizer, [Sequence("h1", torch.tensor([1]), 0)])] == ["codeio/t/0", "codeio/t/1"]
    full = train(TrainArgs(output_dir=str(tmp_path / "d"), draft_vocab_size=None, **common), target=looping_target, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="full vocabulary"):
        train(TrainArgs(output_dir=str(tmp_path / "e"), init_from=str(full), draft_vocab_data=str(tmp_path / "code.jsonl"), **common),
              target=looping_target, tokenizer=tokenizer)


def test_card_names_every_prompt_source_of_the_warm_start_chain(tmp_path):
    """The card's "Training prompts" line and ``datasets:`` metadata come from the answers' ids (reasoning-gym
    prompts carry their source) and from the data card of where unprefixed answers live (a link into a folder
    of ShareGPT answers), never from a folder's name."""
    from types import SimpleNamespace

    from modeling_dflare.training.sequences import count_prompt_sources
    from modeling_dflare.training.card import card_datasets, card_prompt_text, parent_totals

    (tmp_path / "smollm2-sharegpt").mkdir()
    (tmp_path / "smollm2-sharegpt" / "part-00000.jsonl.gz").write_bytes(b"")
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "part-00008.jsonl.gz").symlink_to(tmp_path / "smollm2-sharegpt" / "part-00000.jsonl.gz")
    answers = [SimpleNamespace(id=i) for i in ("SBmYeOI_39", "codeio/codeio-hq/952", "codeio/x/1", "gsm-symbolic/0/7", "q/1")]
    # a folder's name says nothing: its data card (what dflare regenerate writes) does
    assert count_prompt_sources(answers[:1], str(tmp_path / "mix")) == {"other": 1}
    from modeling_dflare.publish_metadata import data_source_entry, write_data_card

    write_data_card(tmp_path / "smollm2-sharegpt", data_source_entry("sharegpt"))
    counts = count_prompt_sources(answers, str(tmp_path / "mix"))
    assert counts == {"codeio": 2, "gsm-symbolic": 1, "sharegpt": 2}  # "q/1": no known prefix, so the folder's source
    assert count_prompt_sources(answers[:1], str(tmp_path / "own.jsonl")) == {"other": 1}
    assert count_prompt_sources(answers[:1], None) == {"sharegpt": 1}  # the built-in ShareGPT reader

    # a parent summary from before the field (r15's): ShareGPT from its data names, the rest from this run
    parent = {"cumulative": {"runs": 12, "steps": 1, "sequences_seen": 4, "cpu_hours": 1.0, "data": ["runs/data-r15", "sharegpt"]}}
    assert parent_totals(parent)["prompt_sources"] == ["sharegpt"]
    summary = {"args": {"data": "runs/data-r16"}, "prompt_sources": {"codeio": 2, "gsm-symbolic": 1},
               "cumulative": {"data": ["runs/data-r16"], "prompt_sources": ["sharegpt"]}}
    assert card_datasets(summary) == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]
    text = card_prompt_text(summary)
    assert text[0] == "anon8231489123/ShareGPT_Vicuna_unfiltered" and len(text) == 3
    assert "GSM-Symbolic" in text[1] and "CodeI/O" in text[2] and all("reasoning-gym" in t for t in text[1:])
    own = {"args": {"data": "my-chats.jsonl"}, "prompt_sources": {"other": 3}, "cumulative": {"data": ["my-chats.jsonl"]}}
    assert card_datasets(own) == card_prompt_text(own) == []  # the card's table names the file instead


def test_cost_measurement_runs_the_prompt_once():
    """The cut tuner's timings share one prompt pass (the plain step and every verify length start
    from the same cache, cropped back after each timed forward), and time plain and verify in the same rounds."""
    from modeling_dflare.testing import make_draft
    from modeling_dflare.training.consistency import measure_costs

    target = tiny_target("llama")
    draft = make_draft(target, block_size=4)
    prompt_length = 9
    sequence = Sequence("s", torch.randint(8, 90, (prompt_length + 6,)), prompt_length)
    lengths = []

    def record(module, args, kwargs):
        lengths.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1])

    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        verify, draft_s, plain_s = measure_costs(draft, target, sequence, repeats=2)
    finally:
        hook.remove()
    assert lengths.count(prompt_length) == 1, lengths
    assert len(verify) == 4 and draft_s > 0 and plain_s > 0
    # 2 rounds, each the plain step (a warm-up and a timed forward), then the 4 verify lengths (a warm-up
    # round and a timed one): a slow spell of the machine lands on plain and verify alike and cannot bend
    # the per-token slope; then the draft's forwards, which do not call the target
    assert lengths[1:] == ([1, 1] + [1, 2, 3, 4] * 2) * 2, lengths


def test_cut_tuner_times_with_the_threads_generation_runs_with(tmp_path, looping_target, monkeypatch):
    """A run trained with ``--threads 1`` (two runs sharing the cores) still times the target for the
    confidence cut with the threads ``generate`` will have: one thread makes every verified token
    dearer and pushes the cut up (met for real: 0.3 at 1 thread, 0.1 at 2, on the same answers)."""
    import modeling_dflare.training.consistency as consistency

    tokenizer = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 6, 0, 24))
    write_jsonl(tmp_path / "heldout.jsonl", _greedy_dataset(tmp_path, looping_target, tokenizer, 2, 100, 24))
    original, seen = consistency.measure_costs, []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(consistency, "measure_costs", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = TrainArgs(
            output_dir=str(tmp_path / "draft"), data=str(tmp_path / "train.jsonl"), heldout=str(tmp_path / "heldout.jsonl"),
            num_hidden_layers=1, block_size=4, max_steps=2, batch_size=2, save_every=100, eval_every=100,
            draft_vocab_size=None, consistency_prompts=1, tune_threshold=True, threads=1,
        )
        out = train(args, target=looping_target, tokenizer=tokenizer)
        assert torch.get_num_threads() == 1  # training itself ran on its --threads
    finally:
        torch.set_num_threads(before)
    import json

    assert seen == [2]
    assert json.loads((out / "training_summary.json").read_text())["threshold_tuning"]["threads"] == 2


def test_hybrid_walk_replays_generate(looping_target):
    """The cost model's replay of the prompt-lookup hybrid (which continuation the context offers
    after the kept drafts, and how much of it the answer follows) gives exactly the cycles and
    tokens of ``generate`` with the same settings, on answers the target itself produced."""
    from transformers import GenerationConfig

    from modeling_dflare.testing import make_draft
    from modeling_dflare.training.consistency import cut_lengths, measure_consistency, walk_costs

    target, block = looping_target, 4
    draft = make_draft(target, block_size=block, prompt_lookup_ngram=3)
    config = GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=30)
    sequences = []
    for seed in range(4):
        prompt = torch.randint(8, 96, (1, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = target.generate(prompt, generation_config=config)
        sequences.append(Sequence(f"s{seed}", out[0], prompt.shape[1]))
    walks: list = []
    measure_consistency(draft, target, TargetFeatures(target), sequences, position_weights(block, 2.0), 30, run_generate=False, walks=walks)
    assert len(walks) == 4 and all(w[3] is not None for w in walks)
    # a lookup confidence that keeps the first draft in about half the blocks, halfway across a wide
    # gap between two first-position confidences (so float noise between the two paths cannot flip it)
    first = torch.cat([w[1][:, 0] for w in walks]).sort().values
    middle = first[len(first) // 4 : 3 * len(first) // 4]
    gap = int((middle[1:] / middle[:-1]).argmax())
    some = float(middle[gap : gap + 2].mean())
    lookups = 0
    # (cut, lookup confidence, shortest n-gram, longest n-gram): lookup after every kept draft / none /
    # only long matches / after a kept first draft, mostly a wrong one (a random draft) / the longest
    # n-gram below and above the draft's own 3
    for cut, confidence, shortest, longest in ((0.0, 1.0, 1, 3), (0.0, 1.0, 3, 3), (0.0, 0.0, 1, 3), (0.0, some, 1, 3),
                                               (0.0, 1.0, 1, 1), (0.0, some, 2, 5)):
        predicted_tokens = predicted_cycles = generated_tokens = generated_cycles = 0
        for sequence, (runs, conf, budget, table) in zip(sequences, walks):
            tokens, cycles = walk_costs(
                runs, cut_lengths(conf, cut), budget, [1.0] * block, 0.0, cut_lengths(conf, max(cut, confidence)), table, shortest, longest
            )
            predicted_tokens, predicted_cycles = predicted_tokens + tokens, predicted_cycles + cycles
            settings = GenerationConfig(**config.to_dict())
            settings.max_new_tokens = budget + 1
            settings.dflare_confidence_threshold, settings.dflare_lookup_confidence = cut, confidence
            settings.dflare_prompt_lookup_min_ngram, settings.dflare_prompt_lookup_ngram = shortest, longest
            prompt = sequence.input_ids[: sequence.response_start][None]
            with torch.no_grad():
                got = target.generate(prompt, assistant_model=draft, generation_config=settings)
            assert got[0].tolist() == sequence.input_ids[: sequence.response_start + budget + 1].tolist()
            stats = draft.dflare_stats
            generated_tokens += sum(stats.accepted) + stats.cycles
            generated_cycles += stats.cycles
            lookups += stats.lookup_tokens
        assert (predicted_tokens, predicted_cycles) == (generated_tokens, generated_cycles), (cut, confidence, shortest, longest)
    assert lookups > 0  # the hybrid really proposed lookups, so the replay was tested on them


def test_learning_curve_table_and_plot(tmp_path):
    """``python -m modeling_dflare.training.curve``: one table row per evaluation, the generate τ on
    each run's last point, a plot with one colour per run (more runs than one palette holds)."""
    import json

    from modeling_dflare.training.curve import main

    specs = []
    for run in range(12):
        curve = [{"step": s, "cpu_hours": run + s / 1000, "acc": [0.5], "tau": 1.5 + s / 1000, "walk_tau": 1.4} for s in (250, 500)]
        (tmp_path / f"r{run}.json").write_text(json.dumps({"curve": curve, "consistency": {"generate_tau": 1.7 + run / 100}}))
        specs.append(f"r{run}={tmp_path / f'r{run}.json'}")
    assert main([str(tmp_path / "out"), *specs]) == 0
    assert (tmp_path / "out" / "training-curve.png").stat().st_size > 10_000
    from modeling_dflare.training.curve import load_curves, markdown_table

    table = markdown_table(load_curves(specs)).splitlines()
    assert len(table) == 2 + 24
    assert table[3].startswith("| r0 | 500 | 0.50 | 0.500 | 2.000 | 1.400 | 1.7 |") and table[2].endswith("| – |")
    with pytest.raises(ValueError, match="expected LABEL=path"):
        load_curves(["r0.json"])


def test_fp8_cache_keeps_every_token_and_layer_to_its_own_scale():
    """fp8 storage: a token 200x larger than the rest (SmolLM2's first token in deep layers) does not
    flush the others to zero; each (token, layer) slice comes back within e4m3's rounding of its own
    largest value; the payload is about half of bf16's and has no ``"h"`` for an older reader to misread."""
    import io

    from modeling_dflare.training.features import decode_hidden, encode_hidden

    hidden = torch.randn(40, 3 * 64, generator=torch.Generator().manual_seed(0))
    hidden[0] *= 25_000.0 / hidden[0].abs().max()  # the attention-sink token
    hidden[5, 64:128] *= 1e-3  # a quiet layer slice of an ordinary token
    payload = encode_hidden(hidden, 3, "fp8")
    assert "h" not in payload and payload["h_fp8"].dtype == torch.float8_e4m3fn
    back = decode_hidden(payload)
    slices, error = hidden.reshape(40, 3, 64), (back - hidden).reshape(40, 3, 64)
    assert (error.abs().amax(-1) <= slices.abs().amax(-1) / 16).all()  # 3 mantissa bits: half a step is 1/16
    assert (back.reshape(40, 3, 64)[5, 1] != 0).all()
    assert torch.equal(decode_hidden(encode_hidden(hidden, 3, "bf16")), hidden.to(torch.bfloat16).float())

    def size(entries: dict) -> int:
        buffer = io.BytesIO()
        torch.save(entries, buffer)
        return buffer.tell()

    hidden = torch.randn(400, 9 * 64)
    assert size(encode_hidden(hidden, 9, "fp8")) < 0.6 * size(encode_hidden(hidden, 9, "bf16"))
    with pytest.raises(ValueError, match="'fp4' is not one of"):
        TargetFeatures(tiny_target("llama"), storage="fp4")
    # training's "auto": fp8, but bf16 for --distill (its teacher reruns the target from the deepest layer)
    assert TrainArgs(output_dir="d").storage == "fp8" and TrainArgs(output_dir="d", distill=0.5).storage == "bf16"
    assert TrainArgs(output_dir="d", distill=0.5, cache_storage="fp8").storage == "fp8"


def test_compact_cache_rewrites_to_fp8_and_drops_what_no_data_uses(tmp_path):
    """``dflare cache``: the kept sequences' files become fp8 and read back close to the target's
    own features; files of sequences the kept data no longer tokenizes to are deleted; a dry run and
    a second run change nothing; a training run reads the mixed cache without recomputing."""
    from modeling_dflare.training.cache import compact_cache, sequence_keys
    from modeling_dflare.training.sequences import read_source, tokenize_conversations

    target, tokenizer = tiny_target("llama", seed=0), tiny_tokenizer()
    records = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"w{i} w{i + 3} w7"}, {"role": "assistant", "content": f"w{i + 1} w{i} w9 w{2 * i}"}]}
        for i in range(6)
    ]
    write_jsonl(tmp_path / "kept.jsonl", records[:4])
    write_jsonl(tmp_path / "old.jsonl", records[4:])
    sequences = {}
    for name in ("kept", "old"):
        sequences[name], _ = tokenize_conversations(tokenizer, read_source(str(tmp_path / f"{name}.jsonl")), 64)
    cache, layers = tmp_path / "cache", [0, 1, 3]
    TargetFeatures(target, cache, storage="bf16").fill(sequences["kept"] + sequences["old"], layers)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 6
    keep = sequence_keys([str(tmp_path / "kept.jsonl")], tokenizer, 64)
    assert len(keep) == 4 and keep < {f.stem for f in files}
    before = {f.name: f.read_bytes() for f in files}

    dry = compact_cache(cache, "fp8", keep, dry_run=True)
    assert (dry["deleted"], dry["rewritten"]) == (2, 4) and {f.name: f.read_bytes() for f in cache.glob("*.pt")} == before
    stats = compact_cache(cache, "fp8", keep)
    assert (stats["deleted"], stats["rewritten"], stats["unreadable"]) == (2, 4, 0)
    assert {f.stem for f in cache.glob("*.pt")} == keep and stats["bytes_after"] < stats["bytes_before"]
    assert all("h_fp8" in torch.load(f, weights_only=True) for f in cache.glob("*.pt"))
    assert compact_cache(cache, "fp8", keep)["rewritten"] == 0

    features, direct = TargetFeatures(target, cache), TargetFeatures(target)
    for sequence in sequences["kept"]:
        read, exact = features(sequence, [3, 0]), direct(sequence, [3, 0])  # any subset, any order
        assert torch.equal(read.predictions, exact.predictions)
        torch.testing.assert_close(read.hidden, exact.hidden, atol=0.1, rtol=0.07)
    assert features.loaded == 4 and features.computed == 0
    with pytest.raises(FileNotFoundError, match="--keep-data 'gone.jsonl' does not exist"):
        sequence_keys(["gone.jsonl"], tokenizer, 64)
    with pytest.raises(ValueError, match="no sequence: that would delete the whole cache"):
        compact_cache(cache, "fp8", set())
    assert len(list(cache.glob("*.pt"))) == 4
