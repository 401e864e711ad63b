"""Training: block mask, anchors, loss weights, overfitting, resume after SIGKILL, train/inference agreement."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.anchors import block_inputs, block_mask, expected_acceptance, position_weights, sample_anchors
from modeling_dflare.data import write_jsonl
from modeling_dflare.testing import tiny_target, tiny_tokenizer
from modeling_dflare.training import Sequence, TargetFeatures, TrainArgs, block_loss, latest_checkpoint, train


def brute_force_mask(anchors, context_length, block_size):
    num = len(anchors)
    mask = torch.zeros(num * block_size, context_length + num * block_size, dtype=torch.bool)
    for q in range(num * block_size):
        block = q // block_size
        for key in range(context_length):
            mask[q, key] = key < anchors[block]
        for key in range(num * block_size):
            mask[q, context_length + key] = key // block_size == block
    return mask


@pytest.mark.parametrize("block_size", [2, 4, 16])
def test_block_mask_matches_brute_force(block_size):
    generator = torch.Generator().manual_seed(block_size)
    anchors = sample_anchors(5, 40, 7, generator)
    assert torch.equal(block_mask(anchors, 40, block_size), brute_force_mask(anchors.tolist(), 40, block_size))


def test_anchors_and_labels_respect_boundaries():
    ids = torch.arange(100, 130)  # length 30
    for seed in range(20):
        anchors = sample_anchors(12, 30, 8, torch.Generator().manual_seed(seed))
        assert anchors.numel() == 8 and anchors.min() >= 11 and anchors.max() <= 28
        assert torch.equal(anchors, anchors.sort().values) and anchors.unique().numel() == 8
        tokens, positions, labels = block_inputs(ids, anchors, 4, mask_token_id=7)
        assert torch.equal(tokens[::4], ids[anchors]) and (tokens.view(-1, 4)[:, 1:] == 7).all()
        for position, label in zip(positions.tolist(), labels.tolist()):
            assert label == (-100 if position >= 30 else ids[position].item()) or position in anchors.tolist()
        assert (labels[::4] == -100).all()
    # a response too short for any anchor gives none, never an out-of-range one
    assert sample_anchors(30, 30, 8).numel() == 0
    # more anchors than positions: every position once
    assert sample_anchors(25, 30, 50).tolist() == [24, 25, 26, 27, 28]


def test_position_weights_and_expected_acceptance():
    weights = position_weights(16, 7.0)
    assert weights[0] == 0 and weights[1] == pytest.approx(1.0) and weights[8] == pytest.approx(torch.exp(torch.tensor(-1.0)).item())
    assert torch.all(weights[2:] < weights[1:-1])
    correct = torch.tensor([[True, True, False], [False, True, True], [True, True, True]])
    assert expected_acceptance(correct) == pytest.approx(1 + (2 + 0 + 3) / 3)


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_overfits_a_fixed_batch(fusion):
    torch.manual_seed(0)
    target = tiny_target("llama", initializer_range=0.5)
    config = DFlareConfig.from_target_config(target.config, num_hidden_layers=2, block_size=4, fusion=fusion)
    draft = DFlareModel(config)
    sequence = Sequence("s", torch.tensor([10 + (7 * j) % 80 for j in range(40)]), 5)
    features = TargetFeatures(target)(sequence, config.target_layer_ids)
    anchors = sample_anchors(5, 40, 16, torch.Generator().manual_seed(0))
    weights = position_weights(4, 7.0)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    head = target.get_output_embeddings().weight
    losses = []
    for _ in range(80):
        result = block_loss(draft, target.get_input_embeddings(), head, None, sequence, features, anchors, weights, "data")
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert losses[-1] < losses[0] / 20
    assert result.correct[result.valid].float().mean() > 0.95


def _tiny_dataset(folder: Path, count: int = 24, name: str = "train", start: int = 0) -> Path:
    import random

    rng = random.Random(start)
    records = []
    for i in range(start, start + count):
        prompt = " ".join(f"w{rng.randrange(88)}" for _ in range(5))
        response = " ".join(f"w{(j * 7 + i) % 88}" for j in range(24))
        records.append({"id": f"c{i}", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    write_jsonl(folder / f"{name}.jsonl", records)
    return folder / f"{name}.jsonl"


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from modeling_dflare.testing import tiny_target, tiny_tokenizer
    from modeling_dflare.training import TrainArgs, train
    out, data, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    heldout = data.replace("train.jsonl", "heldout.jsonl")
    import modeling_dflare.training.loop as t, time
    original, calls = t.block_loss, [0]
    def counted_loss(*a, **k):  # slow enough to be killed mid-run; counts the loop's loss calls
        calls[0] += 1
        time.sleep(slow)
        return original(*a, **k)
    t.block_loss = counted_loss
    args = TrainArgs(output_dir=out, data=data, heldout=heldout, num_hidden_layers=1, block_size=4, num_anchors=4,
                     max_steps=30, batch_size=1, save_every=5, eval_every=1000, lr=1e-3, draft_vocab_size=32)
    train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    print("LOSS CALLS", calls[0])
    """
)


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    """A regeneration still writing into the --data folder must not silently change a resumed run's
    data stream: the run stops with both counts; on the data it started with it resumes (here
    extended to more steps), and nothing of the checkpoint is lost on the way."""
    from modeling_dflare.training import TrainingInputError

    data = _tiny_dataset(tmp_path / "data")
    _tiny_dataset(tmp_path / "data", 4, "heldout", start=100)
    target, tokenizer = tiny_target("llama"), tiny_tokenizer()

    def run(max_steps: int, source: Path):
        args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(source), heldout=str(tmp_path / "data" / "heldout.jsonl"),
                         work_dir=str(tmp_path / "work"), num_hidden_layers=1, block_size=4, num_anchors=4, max_steps=max_steps,
                         batch_size=1, save_every=5, eval_every=1000, lr=1e-3, draft_vocab_size=32, consistency_prompts=0)
        return train(args, target=target, tokenizer=tokenizer)

    run(5, data)
    checkpoints = tmp_path / "work" / "checkpoints"
    saved = json.loads((latest_checkpoint(checkpoints) / "state.json").read_text())["data"]
    assert saved["sequences"] == 24
    grown = _tiny_dataset(tmp_path / "grown", 30)  # the same 24 conversations and 6 more
    with pytest.raises(TrainingInputError, match=r"changed since .*step-5: 24 sequences then .* 30 now"):
        run(10, grown)
    assert latest_checkpoint(checkpoints).name == "step-5"
    run(10, data)
    state = json.loads((latest_checkpoint(checkpoints) / "state.json").read_text())
    assert state["step"] == 10 and state["data"] == saved
    assert "resumed from" in (tmp_path / "work" / "train.log").read_text()


def test_resume_after_sigkill(tmp_path):
    data = _tiny_dataset(tmp_path)
    _tiny_dataset(tmp_path, 4, "heldout", start=100)
    out = tmp_path / "draft"
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    checkpoints = tmp_path / "draft-work" / "checkpoints"
    seen_steps = []
    for kill_after_checkpoint in (5, 15, 20):
        process = subprocess.Popen([sys.executable, str(script), str(out), str(data), "0.05"], env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            latest = latest_checkpoint(checkpoints) if checkpoints.exists() else None
            if latest is not None and int(latest.name.split("-")[1]) >= kill_after_checkpoint:
                break
            time.sleep(0.05)
        time.sleep(0.12)  # land somewhere between checkpoints, possibly mid-save
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = latest_checkpoint(checkpoints)
        assert latest is not None and (latest / "state.json").exists()
        seen_steps.append(json.loads((latest / "state.json").read_text())["step"])
        assert not out.exists()
    assert seen_steps == sorted(seen_steps)
    finished = subprocess.run([sys.executable, str(script), str(out), str(data), "0"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    # the last process trained only the steps after its checkpoint (plus the final held-out pass of
    # at most 4 sequences): a restart at step 0 would need 30 training calls
    calls = int(finished.stdout.split("LOSS CALLS")[-1].split()[0])
    assert 30 - seen_steps[-1] <= calls <= 30 - seen_steps[-1] + 4, (calls, seen_steps)
    assert "resumed from" in (tmp_path / "draft-work" / "train.log").read_text()
    final_state = json.loads((latest_checkpoint(checkpoints) / "state.json").read_text())
    assert final_state["step"] == 30
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 30
    draft = DFlareModel.from_pretrained(out)
    assert draft.config.draft_vocab_size == 32 and draft.draft_vocab_ids.unique().numel() == 32

    # The killed-and-resumed run ends exactly where an uninterrupted run of the same command ends:
    # same fp32 weights, same optimizer moments, same step (a restart at step 0 would differ).
    straight = tmp_path / "straight"
    uninterrupted = subprocess.run([sys.executable, str(script), str(straight), str(data), "0"], env=env, capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    assert int(uninterrupted.stdout.split("LOSS CALLS")[-1].split()[0]) >= 30
    resumed_ckpt = latest_checkpoint(checkpoints)
    straight_ckpt = latest_checkpoint(tmp_path / "straight-work" / "checkpoints")
    assert resumed_ckpt.name == straight_ckpt.name == "step-30"
    from safetensors.torch import load_file

    weights_a, weights_b = load_file(resumed_ckpt / "model.safetensors"), load_file(straight_ckpt / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    optim_a = torch.load(resumed_ckpt / "optimizer.bin", weights_only=False)["state"]
    optim_b = torch.load(straight_ckpt / "optimizer.bin", weights_only=False)["state"]
    assert optim_a.keys() == optim_b.keys() and optim_a
    for index in optim_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(optim_a[index][name]), torch.as_tensor(optim_b[index][name])), (index, name)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import modeling_dflare.training.loop as training

    data = _tiny_dataset(tmp_path)
    heldout = _tiny_dataset(tmp_path, 4, "heldout", start=100)
    args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(data), heldout=str(heldout), num_hidden_layers=1,
                     block_size=4, num_anchors=4, max_steps=20, batch_size=1, save_every=4, eval_every=1000, draft_vocab_size=None)
    original, calls = training.block_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        result = original(*a, **k)
        if calls["n"] == 10:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(training, "block_loss", poisoned)
    # count only training steps: the output-scale calibration also calls block_loss
    monkeypatch.setattr(training._Loop, "calibrate_output_scale", lambda self: 1.0)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    latest = latest_checkpoint(tmp_path / "draft-work" / "checkpoints")
    assert json.loads((latest / "state.json").read_text())["step"] == 8
    assert not (tmp_path / "draft").exists()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_training_pass_equals_inference_pass(fusion, attention):
    """The one-pass training forward (all blocks, sparse mask) must give, for every block, exactly
    what the inference forward gives for that block alone (context cut at its anchor, no mask),
    with either attention for the training pass (CPU training runs eager, generation SDPA).

    Any disagreement here (mask, positions, which hidden states) is the classic "high training
    accuracy, low acceptance" bug.
    """
    torch.manual_seed(0)
    target = tiny_target("qwen3", initializer_range=0.3)
    draft = DFlareModel(DFlareConfig.from_target_config(target.config, num_hidden_layers=2, block_size=4, fusion=fusion)).eval()
    ids = torch.randint(5, 90, (24,))
    features = TargetFeatures(target).compute(ids[None], draft.config.target_layer_ids)
    anchors = torch.tensor([3, 8, 9, 15, 21])
    tokens, positions, _ = block_inputs(ids, anchors, 4, draft.config.mask_token_id)
    embed = target.get_input_embeddings()
    draft.set_attn_implementation(attention)
    with torch.no_grad():
        together = draft(
            noise_embeds=embed(tokens)[None],
            context_hidden_states=features.hidden,
            position_ids=torch.cat([torch.arange(24), positions])[None],
            attention_mask=block_mask(anchors, 24, 4)[None, None],
        ).last_hidden_state[0]
        for index, anchor in enumerate(anchors.tolist()):
            block = slice(4 * index, 4 * index + 4)
            draft.set_attn_implementation("sdpa")
            alone = draft(
                noise_embeds=embed(tokens[block])[None],
                context_hidden_states=features.hidden[:, :anchor],
                position_ids=torch.cat([torch.arange(anchor), positions[block]])[None],
            ).last_hidden_state[0]
            torch.testing.assert_close(together[block], alone, atol=1e-5, rtol=1e-5)
    # and the target's greedy predictions are the argmax of its logits, position by position
    with torch.no_grad():
        logits = target(ids[None]).logits[0]
    assert torch.equal(features.predictions, logits.argmax(-1))


def test_target_labels_keep_only_on_policy_positions():
    from modeling_dflare.training import target_labels

    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    predictions = torch.tensor([6, 7, 99, 9, 10, 11, 12, 13])  # disagrees with the data at position 3
    anchors = torch.tensor([1])
    _, positions, labels = block_inputs(ids, anchors, 4, mask_token_id=0)
    # block at anchor 1: positions 1..4; labels from predictions[0..3]: k=1 -> pred[1]=7, k=2 -> pred[2]=99
    # k=3 needs agreement at position 3 (data 8 vs pred[2]=99): dropped
    assert target_labels(ids, predictions, positions, labels, 4).tolist() == [-100, 7, 99, -100]


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from modeling_dflare.testing import tiny_target, tiny_tokenizer
    from modeling_dflare.training import TrainArgs, train
    import modeling_dflare.training.loop as t
    out, data, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    heldout = data.replace("train.jsonl", "heldout.jsonl")
    original_loss, original_finish = t.block_loss, t._finish
    def slow_loss(*a, **k):  # slow enough for the launcher to be killed between checkpoints
        time.sleep(slow)
        return original_loss(*a, **k)
    def finish(args, accelerator, draft, *rest):  # every rank leaves its final weights behind
        weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(draft).state_dict().items()}
        torch.save(weights, f"{out}.rank{accelerator.process_index}of{accelerator.num_processes}.pt")
        return original_finish(args, accelerator, draft, *rest)
    t.block_loss, t._finish = slow_loss, finish
    args = TrainArgs(output_dir=out, data=data, heldout=heldout, num_hidden_layers=1, block_size=4, num_anchors=4,
                     max_steps=8, batch_size=2, save_every=2, eval_every=1000, lr=1e-3, draft_vocab_size=32, consistency_prompts=0)
    train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    """
)


def _launch(script: Path, out: Path, data: Path, slow: float, processes: int, env: dict) -> subprocess.Popen:
    import socket

    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # accelerate's multi-process launcher (torch.distributed.run); ACCELERATE_USE_CPU=1 makes each rank a gloo CPU rank
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(script), str(out), str(data), str(slow)]
    if processes == 1:
        command = [sys.executable, str(script), str(out), str(data), str(slow)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_accelerate_launch_two_processes_matches_one_and_resumes(tmp_path):
    """``accelerate launch --num_processes 2`` (CPU, gloo): both ranks end with identical weights,
    equal (to float tolerance) to one process taking the doubled batch; a SIGKILL of the launcher
    followed by the same command resumes from the last checkpoint and ends at the same step."""
    data = _tiny_dataset(tmp_path)
    _tiny_dataset(tmp_path, 4, "heldout", start=100)
    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)

    # one process, batch 2 (two micro-batches accumulated)
    single = _launch(script, tmp_path / "single", data, 0.0, 1, env)
    output = single.communicate(timeout=600)[0]
    assert single.returncode == 0, output[-3000:]

    # two processes, killed once mid-run, then the same command again
    out = tmp_path / "two"
    checkpoints = tmp_path / "two-work" / "checkpoints"
    first = _launch(script, out, data, 0.3, 2, env)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        latest = latest_checkpoint(checkpoints) if checkpoints.exists() else None
        if latest is not None and int(latest.name.split("-")[1]) >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and both ranks
    first.wait()
    killed_at = int(latest_checkpoint(checkpoints).name.split("-")[1])
    assert 2 <= killed_at < 8 and not out.exists()
    from safetensors.torch import load_file

    at_kill = load_file(latest_checkpoint(checkpoints) / "model.safetensors")
    second = _launch(script, out, data, 0.0, 2, env)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    assert "resumed from" in (tmp_path / "two-work" / "train.log").read_text()
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 8

    rank0 = torch.load(f"{out}.rank0of2.pt")
    rank1 = torch.load(f"{out}.rank1of2.pt")
    alone = torch.load(f"{tmp_path / 'single'}.rank0of1.pt")
    assert rank0.keys() == rank1.keys() == alone.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the replicas identical
        assert torch.allclose(rank0[key], alone[key], atol=1e-5, rtol=1e-4), key  # same sequences, same mean gradient
    # and the steps after the kill really trained (else the comparison above would be vacuous)
    shared = [k for k in rank0 if k in at_kill]
    assert shared and any(not torch.allclose(rank0[k], at_kill[k].float()) for k in shared)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_where_the_cpu_runs_it_natively(monkeypatch, native):
    import modeling_dflare.cpu_kernels_dflare as modeling
    from modeling_dflare.training.loop import _precision

    monkeypatch.setattr(modeling, "bf16_is_native", lambda: native)
    args = TrainArgs(output_dir="unused")
    assert _precision(args, "cpu") == ("bf16" if native else "no")
    assert _precision(args, "cuda") == "bf16"
    assert _precision(TrainArgs(output_dir="unused", precision="no"), "cuda") == "no"


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_training_step_runs_the_whole_loss_under_the_chosen_precision(tmp_path, monkeypatch, precision):
    """bf16 autocast covers the head product and loss of a training step (accelerate only wraps the
    draft's forward), the weights stay fp32, and the summary and card say which precision ran."""
    import modeling_dflare.training.loop as loop

    data = _tiny_dataset(tmp_path)
    heldout = _tiny_dataset(tmp_path, 4, "heldout", start=100)
    original, seen = loop.block_loss, []

    def watched(*args, **kwargs):
        if torch.is_grad_enabled():  # a training step (calibration and evaluation run without grad)
            seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "block_loss", watched)
    args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(data), heldout=str(heldout), num_hidden_layers=1, block_size=4,
                     num_anchors=4, max_steps=3, batch_size=2, eval_every=1000, lr=1e-3, draft_vocab_size=32,
                     consistency_prompts=0, precision=precision)
    out = train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    summary = json.loads((out / "training_summary.json").read_text())
    assert seen == [precision == "bf16"] * 6  # 3 steps x 2 sequences
    assert summary["precision"] == precision and all(torch.isfinite(torch.tensor(h)) for h in [summary["final_train_loss"]])
    card = (out / "README.md").read_text()
    assert ("bf16 autocast" in card) == (precision == "bf16")
    assert DFlareModel.from_pretrained(out).dtype == torch.bfloat16  # saved in bf16 either way


def test_a_resumed_run_keeps_the_feature_time_of_the_launch_before_it(tmp_path):
    """The feature pass runs once, in the first launch; a run resumed from its checkpoint reads the
    cache and still counts that time in its CPU-hours (it is part of what the draft cost)."""
    data = _tiny_dataset(tmp_path / "data")
    heldout = _tiny_dataset(tmp_path / "data", 4, "heldout", start=100)
    target, tokenizer = tiny_target("llama"), tiny_tokenizer()

    def run(max_steps: int):
        args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(data), heldout=str(heldout), work_dir=str(tmp_path / "work"),
                         num_hidden_layers=1, block_size=4, num_anchors=4, max_steps=max_steps, batch_size=1, save_every=5,
                         eval_every=1000, lr=1e-3, draft_vocab_size=32, consistency_prompts=0, hidden_cache=str(tmp_path / "cache"))
        return json.loads((train(args, target=target, tokenizer=tokenizer) / "training_summary.json").read_text())

    first = run(5)["target_features"]
    assert first["computed"] == 28 and first["seconds"] > 0 and first["seconds_total"] == first["seconds"]
    resumed = run(10)
    features = resumed["target_features"]
    # this launch computed nothing; its fill only checked the cache (milliseconds, more on a loaded machine)
    assert features["computed"] == 0 and features["seconds"] < first["seconds"] + 1.0
    assert features["seconds_total"] == pytest.approx(first["seconds_total"] + features["seconds"], abs=1.5e-3)
    assert resumed["cpu_hours"] * 3600 >= resumed["train_seconds"] + features["seconds_total"] - 0.5


def test_cpu_training_steps_use_eager_attention_and_generation_gets_sdpa_back(tmp_path, monkeypatch):
    """Training steps on CPU attend with the masked softmax (faster than CPU SDPA under the sparse
    block mask); the cut tuner, which times the draft as generation runs it, and the saved draft
    see the implementation the draft came with."""
    import modeling_dflare.training.consistency as consistency
    import modeling_dflare.training.loop as loop

    data = _tiny_dataset(tmp_path)
    heldout = _tiny_dataset(tmp_path, 4, "heldout", start=100)
    original_loss, original_tune, during_steps, at_tuning = loop.block_loss, consistency.tune_threshold, [], []

    def watched_loss(draft, *args, **kwargs):
        if torch.is_grad_enabled():
            during_steps.append(getattr(draft, "module", draft).config._attn_implementation)
        return original_loss(draft, *args, **kwargs)

    def watched_tune(draft, *args, **kwargs):
        at_tuning.append(draft.config._attn_implementation)
        return original_tune(draft, *args, **kwargs)

    monkeypatch.setattr(loop, "block_loss", watched_loss)
    monkeypatch.setattr(consistency, "tune_threshold", watched_tune)
    args = TrainArgs(output_dir=str(tmp_path / "draft"), data=str(data), heldout=str(heldout), num_hidden_layers=1, block_size=4,
                     num_anchors=4, max_steps=2, batch_size=2, eval_every=1000, lr=1e-3, draft_vocab_size=32,
                     consistency_prompts=1, tune_threshold=True)
    out = train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    assert during_steps == ["eager"] * 4 and at_tuning == ["sdpa"]
    assert DFlareModel.from_pretrained(out).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_grown_draft_starts_as_the_draft_it_grew_from_and_trains(tmp_path, fusion):
    """--grow-layers adds layers on top that start as identities: the grown draft's output equals the
    original's at step 0 (so a warm start keeps its acceptance), the new layers train, and the
    saved config has the new depth."""
    from modeling_dflare.training.draft_init import grow_draft

    torch.manual_seed(0)
    target = tiny_target("llama")
    draft = DFlareModel(DFlareConfig.from_target_config(target.config, num_hidden_layers=2, block_size=4, fusion=fusion))
    with torch.no_grad():  # a draft that has moved away from its initialisation
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    grown = grow_draft(draft, target, 2)
    assert grown.config.num_hidden_layers == 4 and len(grown.config.layer_types) == 4
    ids = torch.randint(5, 90, (20,))
    features = TargetFeatures(target).compute(ids[None], draft.config.target_layer_ids)
    embed = target.get_input_embeddings()
    inputs = dict(noise_embeds=embed(ids[16:])[None], context_hidden_states=features.hidden[:, :16])
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).last_hidden_state, draft(**inputs).last_hidden_state)
    assert not torch.equal(grown.layers[3].mlp.up_proj.weight, torch.zeros_like(grown.layers[3].mlp.up_proj.weight))
    with pytest.raises(ValueError, match="grow by 0 layers"):
        grow_draft(draft, target, 0)

    draft.save_pretrained(tmp_path / "small")
    data = _tiny_dataset(tmp_path)
    args = TrainArgs(output_dir=str(tmp_path / "grown"), data=str(data), heldout=str(_tiny_dataset(tmp_path, 4, "heldout", start=100)),
                     init_from=str(tmp_path / "small"), grow_layers=1, fusion=fusion, block_size=4, num_anchors=4, max_steps=3,
                     batch_size=2, eval_every=1000, lr=1e-2, draft_vocab_size=None, consistency_prompts=0)
    trained = DFlareModel.from_pretrained(train(args, target=target, tokenizer=tiny_tokenizer()), dtype=torch.float32)
    assert trained.config.num_hidden_layers == 3
    assert trained.layers[2].self_attn.o_proj.weight.abs().sum() > 0  # the identity opened up


def _tiny_args(tmp_path, **overrides) -> TrainArgs:
    """A two-step run on a tiny dataset (written once into ``tmp_path / "data"``)."""
    data, heldout = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "heldout.jsonl"
    if not data.exists():
        _tiny_dataset(tmp_path / "data")
        _tiny_dataset(tmp_path / "data", 4, "heldout", start=100)
    fields = dict(output_dir=str(tmp_path / "draft"), data=str(data), heldout=str(heldout), num_hidden_layers=1, block_size=4,
                  num_anchors=4, max_steps=2, batch_size=1, save_every=100, eval_every=1000, lr=1e-3, draft_vocab_size=32,
                  consistency_prompts=0)
    return TrainArgs(**{**fields, **overrides})


@pytest.mark.parametrize("content", ["notes", "target-folder"])
def test_an_output_dir_holding_other_files_is_refused_at_the_start_and_left_alone(tmp_path, content):
    """``--output-dir`` pointing at a folder of someone else's files (notes, a target model folder) is
    refused before anything runs, in one line saying how to proceed; every file stays, and no work
    folder is made."""
    from modeling_dflare.training import TrainingInputError

    out = tmp_path / "draft"
    out.mkdir()
    if content == "notes":
        (out / "notes.txt").write_text("a week of notes")
    else:
        tiny_target("llama").save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TrainingInputError) as info:
        train(_tiny_args(tmp_path), target=tiny_target("llama"), tokenizer=tiny_tokenizer())
    message = str(info.value)
    assert f"--output-dir {str(out)!r} exists" in message and "choose a new folder" in message and "\n" not in message
    assert ("notes.txt" in message) if content == "notes" else ("model_type 'dflare'" in message)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "draft-work").exists()


def test_a_draft_an_earlier_run_wrote_is_replaced_and_nothing_beside_it_is_touched(tmp_path):
    """A second run into the same --output-dir replaces the earlier draft (all of whose files dflare
    train wrote) through a temporary folder of its own: a user's ``draft.tmp`` folder beside it (the
    name the old code cleared) keeps its files, and no temporary folder is left behind."""
    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    beside = tmp_path / "draft.tmp"
    beside.mkdir()
    (beside / "mine.txt").write_text("not a draft")
    first = train(_tiny_args(tmp_path), target=target, tokenizer=tokenizer)
    assert json.loads((first / "training_summary.json").read_text())["steps"] == 2
    second = train(_tiny_args(tmp_path, max_steps=3), target=target, tokenizer=tokenizer)  # resumes, one step more
    assert second == first and json.loads((second / "training_summary.json").read_text())["steps"] == 3
    assert DFlareModel.from_pretrained(second).config.model_type == "dflare"
    assert (beside / "mine.txt").read_text() == "not a draft"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "draft", "draft-work", "draft.tmp"]


def test_a_file_added_to_the_output_dir_during_training_is_kept(tmp_path):
    """Were files of someone else added to the output folder while the run trained, the finished
    draft goes to a new sibling folder and the output folder is not touched; an earlier draft that
    was replaced loses only the files dflare train writes."""
    from modeling_dflare.training.loop import _install_output

    def finished_draft(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "dflare"}))
        (folder / "training_summary.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(name.encode())
        return folder

    out = finished_draft("draft")
    (out / "bench.json").write_text("the user's results")  # arrived during the run
    placed = _install_output(finished_draft(".new"), out)
    assert placed != out and placed.parent == tmp_path and (placed / "model.safetensors").read_bytes() == b".new"
    assert (out / "bench.json").read_text() == "the user's results" and (out / "model.safetensors").read_bytes() == b"draft"
    (out / "bench.json").unlink()
    assert _install_output(finished_draft(".newer"), out) == out and (out / "model.safetensors").read_bytes() == b".newer"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_features_only_keeps_a_hidden_cache_placed_in_its_work_folder(tmp_path):
    """``--features-only`` removes the work folder it made only when it holds nothing but the run's
    own log: a --hidden-cache inside it was just filled and stays, with every file."""
    work = tmp_path / "draft-work"
    args = _tiny_args(tmp_path, hidden_cache=str(work / "cache"), features_only=True)
    assert train(args, target=tiny_target("llama"), tokenizer=tiny_tokenizer()) is None
    files = list((work / "cache").glob("*.pt"))
    assert len(files) == 28 and all(f.stat().st_size > 0 for f in files)
    assert (work / "cache" / "manifest.json").is_file()
    # with the cache elsewhere, the work folder (a log and no checkpoint) is removed
    assert train(_tiny_args(tmp_path, hidden_cache=str(tmp_path / "cache"), features_only=True, work_dir=str(tmp_path / "w2")),
                 target=tiny_target("llama"), tokenizer=tiny_tokenizer()) is None
    assert not (tmp_path / "w2").exists() and len(list((tmp_path / "cache").glob("*.pt"))) == 28


def test_a_second_run_with_the_same_work_folder_is_refused_while_the_first_runs(tmp_path):
    """Two trainings with the same --output-dir share a work folder: the second one (here: another
    process holding the first one's lock) is refused at its start and the first one's checkpoint stays."""
    pytest.importorskip("fcntl")
    from modeling_dflare.training import TrainingInputError

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    train(_tiny_args(tmp_path, save_every=2), target=target, tokenizer=tokenizer)
    checkpoints = tmp_path / "draft-work" / "checkpoints"
    kept = {p.name: p.read_bytes() for p in (checkpoints / "step-2").iterdir()}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(checkpoints)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingInputError, match="another dflare train is running with the work folder"):
            train(_tiny_args(tmp_path, max_steps=4, save_every=1), target=target, tokenizer=tokenizer)
    finally:
        holder.communicate("")
    assert {p.name: p.read_bytes() for p in (checkpoints / "step-2").iterdir()} == kept
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]
    assert json.loads((train(_tiny_args(tmp_path, max_steps=3), target=target, tokenizer=tokenizer) / "training_summary.json")
                      .read_text())["steps"] == 3  # once it is released, the run resumes there
