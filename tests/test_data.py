"""Data readers: the cut-off ShareGPT file, malformed records, JSONL, the held-out split; checkpoint safety."""

import errno
import json

import pytest

from modeling_dflare.data import (
    humaneval_prompts,
    is_heldout,
    read_conversations,
    read_hf_dataset,
    read_jsonl,
    read_sharegpt,
    sharegpt_path,
    split_conversations,
)
from modeling_dflare.training import latest_checkpoint, save_checkpoint

GOOD = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def _records():
    return [
        GOOD,
        {"id": "b", "conversations": []},  # empty conversation
        {"id": "c", "conversations": [{"from": "human", "value": 42}]},  # non-string content
        {"id": "d", "conversations": [{"from": "narrator", "value": "x"}]},  # wrong role
        {"id": "e", "conversations": [{"from": "human", "value": "y" * 300_000}]},  # huge record
        "not an object",
        {"id": "f", "conversations": [{"from": "gpt", "value": "no user turn"}]},
        {"id": "g", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]


def test_truncated_sharegpt_keeps_complete_records_and_counts_the_rest(tmp_path):
    text = json.dumps(_records(), indent=2)
    cut = text[: text.rindex('"id": "g"') + 20]  # cut in the middle of the last record
    path = tmp_path / "cut.json"
    path.write_text(cut)
    conversations, report = read_sharegpt(path)
    assert [c.id for c in conversations] == ["a"]
    assert report.truncated_tail
    assert report.kept == 1 and report.dropped == 7
    assert report.skipped["incomplete record at the cut-off end of the file"] == 1
    assert report.skipped["non-string content"] == 1 and report.skipped["unknown role"] == 1
    assert report.skipped["empty or non-list conversation"] == 1 and report.skipped["record is not an object"] == 1
    assert "kept 1 conversations, dropped 7" in report.summary()
    assert conversations[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_complete_file_reads_every_record(tmp_path):
    path = tmp_path / "full.json"
    path.write_text(json.dumps([GOOD, GOOD | {"id": "z"}]))
    conversations, report = read_sharegpt(path)
    assert [c.id for c in conversations] == ["a", "z"] and not report.truncated_tail and report.dropped == 0


def test_jsonl_and_datasets_layouts(tmp_path):
    import datasets

    path = tmp_path / "chats.jsonl"
    lines = [
        json.dumps({"id": "p", "prompt": "say hi", "response": "hi"}),
        "{broken json",
        json.dumps({"id": "m", "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}),
        "",
    ]
    path.write_text("\n".join(lines))
    conversations, report = read_jsonl(path)
    assert [c.id for c in conversations] == ["p", "m"] and report.skipped["invalid JSON line"] == 1
    rows = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "", "response": "c"}])
    conversations, report = read_hf_dataset(rows, "mem")
    assert len(conversations) == 1 and report.skipped["no non-empty user turn"] == 1


def test_read_conversations_rejects_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="expected 'sharegpt'"):
        read_conversations(tmp_path / "data.csv")


def test_shipped_sharegpt_file_is_cut_off_and_read_tolerantly():
    conversations, report = read_sharegpt(sharegpt_path())
    assert report.truncated_tail and report.kept > 10_000 and report.dropped > 0
    assert all(any(m["role"] == "user" for m in c.messages) for c in conversations[:500])


def test_heldout_split_is_stable_and_humaneval_is_separate():
    conversations, _ = read_sharegpt(sharegpt_path())
    train, heldout = split_conversations(conversations[:3000])
    assert 0.005 < len(heldout) / 3000 < 0.05
    assert not {c.id for c in train} & {c.id for c in heldout}
    assert all(is_heldout(c.id) for c in heldout)
    humaneval = humaneval_prompts()
    assert len(humaneval) == 164 and all(c.id.startswith("HumanEval/") for c in humaneval)


class _DiskFullAccelerator:
    """Writes part of a checkpoint, then fails like a full disk (ENOSPC)."""

    is_main_process = True

    def __init__(self, fail: bool):
        self.fail = fail

    def save_state(self, folder, safe_serialization=True):
        import os

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
            handle.write(b"partial")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")

    def wait_for_everyone(self):
        pass


def test_full_disk_never_replaces_the_last_good_checkpoint(tmp_path):
    save_checkpoint(_DiskFullAccelerator(fail=False), tmp_path, {"step": 10})
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_DiskFullAccelerator(fail=True), tmp_path, {"step": 20})
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-10" and json.loads((latest / "state.json").read_text())["step"] == 10
    # the half-written one is never picked up, and the next good save replaces it cleanly
    assert (tmp_path / "tmp-step-20").exists()
    save_checkpoint(_DiskFullAccelerator(fail=False), tmp_path, {"step": 20})
    assert latest_checkpoint(tmp_path).name == "step-20" and not (tmp_path / "tmp-step-20").exists()


def test_regeneration_writes_resumable_shards(tmp_path):
    from modeling_dflare.data import Conversation
    from modeling_dflare.regenerate import RegenerateConfig, done_ids, read_regenerated, regenerate
    from modeling_dflare.testing import tiny_target, tiny_tokenizer

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    conversations = [Conversation(f"c{i}", [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]) for i in range(5)]
    config = RegenerateConfig(max_new_tokens=6, batch_size=2, shard_size=2, precision="fp32")
    regenerate(target, tokenizer, conversations[:3], tmp_path, config)
    assert done_ids(tmp_path) == {"c0", "c1", "c2"} and not list(tmp_path.glob("*.tmp"))
    first = {c.id: c.messages for c in read_regenerated(tmp_path)}
    # a rerun (as after an interruption) answers only what is missing and keeps what was written
    regenerate(target, tokenizer, conversations, tmp_path, config)
    again = {c.id: c.messages for c in read_regenerated(tmp_path)}
    assert set(again) == {f"c{i}" for i in range(5)} and all(again[k] == v for k, v in first.items())
    assert all(m[-1]["role"] == "assistant" and m[-1]["content"] for m in again.values())
    # responses are the target's own greedy continuation of the chat-templated prompt
    ids = tokenizer.apply_chat_template(conversations[0].messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert again["c0"][-1]["content"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_regeneration_limit_packing_and_assistant_first_chats(tmp_path):
    """``limit`` counts answers after the prompt-length filter, packed parts count as answered, and a
    chat that opens with an assistant turn is answered from its first user turn."""
    import gzip

    from modeling_dflare.data import Conversation
    from modeling_dflare.regenerate import RegenerateConfig, done_ids, pack_shards, read_regenerated, regenerate
    from modeling_dflare.testing import tiny_target, tiny_tokenizer

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    long_prompt = " ".join(f"w{i % 80}" for i in range(60))
    conversations = [Conversation("long", [{"role": "user", "content": long_prompt}])] + [
        Conversation(f"c{i}", [{"role": "assistant", "content": "w1 w2"}, {"role": "user", "content": f"w{i} w{i + 1}"}])
        for i in range(6)
    ]
    config = RegenerateConfig(max_prompt_tokens=30, max_new_tokens=4, batch_size=2, shard_size=2, precision="fp32")
    regenerate(target, tokenizer, conversations, tmp_path, config, limit=3)
    assert len(done_ids(tmp_path)) == 3 and "long" not in done_ids(tmp_path)
    answered = read_regenerated(tmp_path)
    assert all([m["role"] for m in c.messages] == ["user", "assistant"] for c in answered)
    part = pack_shards(tmp_path)
    assert part.name == "part-00000.jsonl.gz" and not list(tmp_path.glob("shard-*.jsonl"))
    assert oct(part.stat().st_mode & 0o777) == "0o644"
    with gzip.open(part, "rt") as handle:
        assert len(handle.read().splitlines()) == 3
    again = pack_shards(tmp_path)
    assert again is None  # nothing loose to pack
    regenerate(target, tokenizer, conversations, tmp_path, config, limit=5)
    assert len(done_ids(tmp_path)) == 5 and len(read_regenerated(tmp_path)) == 5
    assert pack_shards(tmp_path).name == "part-00001.jsonl.gz"
    assert len(done_ids(tmp_path)) == 5


def test_sampled_answers_are_variants_of_their_prompt_on_its_side_of_every_split(tmp_path):
    """``--sample`` answers carry ``<prompt id>#sample-...`` ids: they resume on their own ids, train
    beside the greedy answers to the same prompts (not deduplicated away), and follow the prompt's
    id into the held-out, tune and report splits, and out of training when the prompt is held out."""
    from types import SimpleNamespace

    from modeling_dflare.data import Conversation, is_heldout, is_report_prompt, prompt_id
    from modeling_dflare.regenerate import RegenerateConfig, done_ids, read_regenerated, regenerate
    from modeling_dflare.testing import tiny_target, tiny_tokenizer
    from modeling_dflare.training.sequences import load_training_conversations

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    conversations = [Conversation(f"c{i}", [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]) for i in range(4)]
    greedy = RegenerateConfig(max_new_tokens=6, batch_size=2, shard_size=2, precision="fp32")
    sampled = RegenerateConfig(max_new_tokens=6, batch_size=2, shard_size=2, precision="fp32", do_sample=True, temperature=1.5, seed=3)
    regenerate(target, tokenizer, conversations, tmp_path / "greedy", greedy)
    regenerate(target, tokenizer, conversations[:2], tmp_path / "sampled", sampled)
    regenerate(target, tokenizer, conversations, tmp_path / "sampled", sampled)  # resumes: answers c2, c3 only
    assert done_ids(tmp_path / "sampled") == {f"c{i}#sample-s3-t1.5" for i in range(4)}
    assert prompt_id("c1#sample-s3-t1.5") == "c1" and prompt_id("c1") == "c1"
    answers = {c.id: c.messages[-1]["content"] for folder in ("greedy", "sampled") for c in read_regenerated(tmp_path / folder)}
    assert any(answers[f"c{i}"] != answers[f"c{i}#sample-s3-t1.5"] for i in range(4))  # sampled, not greedy again
    for name in [f"p{i}" for i in range(2000)]:
        variant = name + "#sample-s0-t0.7"
        assert is_heldout(variant) == is_heldout(name) and is_report_prompt(variant) == is_report_prompt(name)
    # both folders train together; a held-out prompt takes its sampled answers out of training too
    held = tmp_path / "heldout.jsonl"
    from modeling_dflare.data import write_jsonl

    write_jsonl(held, [{"id": "c0", "messages": conversations[0].messages + [{"role": "assistant", "content": "w1"}]}])
    args = SimpleNamespace(data=f"{tmp_path / 'greedy'},{tmp_path / 'sampled'}", heldout=str(held))
    train, heldout = load_training_conversations(args)
    assert sorted(c.id for c in train) == sorted([f"c{i}" for i in (1, 2, 3)] + [f"c{i}#sample-s3-t1.5" for i in (1, 2, 3)])
    assert [c.id for c in heldout] == ["c0"]


def test_later_turns_are_answered_after_the_chats_own_history(tmp_path):
    """``--turn 2`` answers each chat's second user turn after its first exchange as the data has it,
    stores it as ``<id>#turn2`` (a variant of the chat: same side of every split), skips chats with
    one user turn, and trains on the new reply only, with the history as its prompt."""
    from modeling_dflare.data import Conversation, is_heldout, prompt_id
    from modeling_dflare.regenerate import RegenerateConfig, done_ids, read_regenerated, regenerate
    from modeling_dflare.testing import tiny_target, tiny_tokenizer
    from modeling_dflare.training.sequences import tokenize_conversations

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    two_turns = [
        Conversation(f"c{i}", [
            {"role": "system", "content": "w5"},
            {"role": "user", "content": f"w{i} w{i + 1}"},
            {"role": "assistant", "content": f"w{i + 20} w{i + 21} w{i + 22}"},
            {"role": "user", "content": f"w{i + 40}"},
            {"role": "assistant", "content": "w70 w71"},  # the data's own reply: replaced
        ])
        for i in range(3)
    ]
    one_turn = Conversation("single", [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w8"}])
    assert two_turns[0].prompt_at(1) == two_turns[0].first_prompt and one_turn.prompt_at(2) is None
    with pytest.raises(ValueError, match="turn 0: expected 1 or more"):
        one_turn.prompt_at(0)
    config = RegenerateConfig(max_new_tokens=5, batch_size=2, shard_size=2, precision="fp32", turn=2)
    assert RegenerateConfig(turn=2, do_sample=True, seed=1).variant == "#turn2#sample-s1-t0.7"
    regenerate(target, tokenizer, two_turns + [one_turn], tmp_path, config)
    assert done_ids(tmp_path) == {"c0#turn2", "c1#turn2", "c2#turn2"}
    answers = {c.id: c.messages for c in read_regenerated(tmp_path)}
    history = two_turns[1].messages[:4]
    assert answers["c1#turn2"][:4] == history and answers["c1#turn2"][4]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = target.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert answers["c1#turn2"][4]["content"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert prompt_id("c1#turn2") == "c1" and all(is_heldout(f"p{i}#turn2") == is_heldout(f"p{i}") for i in range(2000))
    (sequence,), _ = tokenize_conversations(tokenizer, [Conversation("c1#turn2", answers["c1#turn2"])], 512)
    assert sequence.response_start == ids.shape[1]  # the whole history is prompt; the new reply is the response


def _write_shards(out_dir, count, tag):
    from modeling_dflare.regenerate import write_new_shard

    for i in range(count):
        write_new_shard(out_dir, [{"id": f"{tag}{i}", "messages": []}])


def test_worker_shares_split_the_prompts_and_share_one_folder(tmp_path):
    """``--worker K/N``: N processes answer disjoint shares whose union is every prompt, with the same
    answers one process gives; shard names are claimed so two writers never overwrite each other."""
    import multiprocessing

    from modeling_dflare.data import Conversation
    from modeling_dflare.regenerate import RegenerateConfig, done_ids, parse_worker, read_regenerated, regenerate, worker_share
    from modeling_dflare.testing import tiny_target, tiny_tokenizer

    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    conversations = [Conversation(f"c{i}", [{"role": "user", "content": f"w{i} w{i + 1}"}]) for i in range(10)]
    shares = {worker_share(c.id, 2) for c in conversations}
    assert shares == {0, 1}  # both shares hold prompts, so the split below is not vacuous
    config = dict(max_new_tokens=4, batch_size=1, shard_size=1, precision="fp32")
    regenerate(target, tokenizer, conversations, tmp_path / "one", RegenerateConfig(**config))
    for k in (0, 1):
        regenerate(target, tokenizer, conversations, tmp_path / "two", RegenerateConfig(**config, worker=(k, 2)), limit=3)
    first = {c.id for c in read_regenerated(tmp_path / "two")}
    assert len(first) == 6 and all(sum(worker_share(i, 2) == k for i in first) == 3 for k in (0, 1))
    regenerate(target, tokenizer, conversations, tmp_path / "two", RegenerateConfig(**config, worker=(1, 2)))
    regenerate(target, tokenizer, conversations, tmp_path / "two", RegenerateConfig(**config, worker=(0, 2)))
    one = {c.id: c.messages for c in read_regenerated(tmp_path / "one")}
    two = read_regenerated(tmp_path / "two")
    assert len(two) == 10 and {c.id: c.messages for c in two} == one  # disjoint, complete, the same answers
    # two processes writing shards into one folder at once: every shard kept, no name taken twice
    folder = tmp_path / "race"
    folder.mkdir()
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_shards, args=(folder, 40, tag)) for tag in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert done_ids(folder) == {f"{t}{i}" for t in "ab" for i in range(40)} and len(list(folder.glob("shard-*.jsonl"))) == 80
    assert not list(folder.glob(".*.tmp"))
    assert parse_worker("1/3") == (1, 3)
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match=f"--worker '{bad}': expected K/N"):
            parse_worker(bad)
