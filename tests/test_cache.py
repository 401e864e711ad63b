"""The hidden-state cache knows what it holds: its manifest, per-file checks, concurrent writers, and
``dflare cache`` pruning only with the settings that filled it."""

import json
import os
import threading

import pytest
import torch

import dflare_cli
from modeling_dflare.data import write_jsonl
from modeling_dflare.testing import tiny_target, tiny_tokenizer
from modeling_dflare.training import TargetFeatures
from modeling_dflare.training import features as features_module
from modeling_dflare.training.cache import compact_cache, keep_keys
from modeling_dflare.training.sequences import read_source, tokenize_conversations
from modeling_dflare.training.features import CacheMismatchError, cache_key, read_manifest

LAYERS = [0, 1, 3]


def _records(count: int, words: int = 30) -> list[dict]:
    """Chats whose answers run past 32 tokens: at --max-length 32 they are cut, at 768 they are not."""
    return [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"w{i} w{i + 3} w7"},
                                     {"role": "assistant", "content": " ".join(f"w{(i + 5 * j) % 80}" for j in range(words))}]}
        for i in range(count)
    ]


@pytest.fixture
def filled(tmp_path):
    """A cache filled the way ``dflare train --max-length 32`` fills it, and the data it was filled from."""
    target, tokenizer = tiny_target("llama", seed=0), tiny_tokenizer()
    write_jsonl(tmp_path / "data.jsonl", _records(5))
    sequences, _ = tokenize_conversations(tokenizer, read_source(str(tmp_path / "data.jsonl")), 32)
    cache = tmp_path / "cache"
    TargetFeatures(target, cache, storage="bf16", tokenizer=tokenizer, max_length=32).fill(sequences, LAYERS)
    return target, tokenizer, sequences, cache


def test_the_manifest_records_target_tokenizer_lengths_layers_and_storage(filled):
    target, tokenizer, sequences, cache = filled
    manifest = json.loads((cache / "manifest.json").read_text())
    from modeling_dflare.generation_dflare import target_fingerprint

    assert manifest["target_fingerprint"] == target_fingerprint(target) and manifest["hidden_size"] == target.config.hidden_size
    assert [t["vocab_size"] for t in manifest["tokenizers"]] == [len(tokenizer)]
    assert manifest["max_lengths"] == [32] and manifest["layers"] == LAYERS and manifest["storage"] == "bf16"
    assert len(list(cache.glob("*.pt"))) == len(sequences)
    # another training run at another length adds its length; nothing else changes
    TargetFeatures(target, cache, tokenizer=tokenizer, max_length=64)
    assert read_manifest(cache)["max_lengths"] == [32, 64]


def test_a_cache_of_another_target_is_refused_not_read(filled):
    """The keys hash token ids only: another target with the same tokenizer would read this one's
    features as its own. Its manifest refuses it, naming what to do."""
    _, tokenizer, sequences, cache = filled
    other = tiny_target("llama", seed=1)
    with pytest.raises(CacheMismatchError, match="holds the features of another target.*--hidden-cache folder of its own"):
        TargetFeatures(other, cache, tokenizer=tokenizer)
    with pytest.raises(CacheMismatchError, match="another target"):
        TargetFeatures(tiny_target("llama", seed=0, hidden_size=48, head_dim=8), cache)


@pytest.mark.parametrize("damage", ["other-sequence", "narrower", "missing-layer", "no-payload"])
def test_a_file_that_does_not_fit_its_sequence_is_recomputed_never_read(filled, damage):
    """A cache file whose rows, width or layers do not match its key's sequence (a file copied under
    another name, a cache of a narrower model, a foreign pickle) is a miss: recomputed, and the
    features are the target's own."""
    target, _, sequences, cache = filled
    sequence = sequences[0]
    path = cache / f"{cache_key(sequence.input_ids)}.pt"
    payload = torch.load(path, weights_only=True)
    width = target.config.hidden_size
    if damage == "other-sequence":  # a whole payload, of a sequence 3 tokens shorter
        shorter = TargetFeatures(target).compute(sequence.input_ids[None, :-3], LAYERS)
        payload = {"layers": LAYERS, "predictions": shorter.predictions.int(), "h": shorter.hidden[0].to(torch.bfloat16)}
    elif damage == "narrower":  # 3 layers half as wide: it agrees with itself, not with this target
        payload["h"] = payload["h"][:, : len(LAYERS) * width // 2]
    elif damage == "missing-layer":
        payload = {**payload, "layers": [0, 1, 2]}
    else:
        payload = {"weights": torch.zeros(3)}
    torch.save(payload, path)
    features, direct = TargetFeatures(target, cache, storage="bf16"), TargetFeatures(target)
    got, exact = features(sequence, LAYERS), direct(sequence, LAYERS)
    assert features.computed == 1 and features.loaded == 0
    assert torch.equal(got.predictions, exact.predictions) and got.hidden.shape == exact.hidden.shape
    torch.testing.assert_close(got.hidden, exact.hidden)
    again = TargetFeatures(target, cache)
    torch.testing.assert_close(again(sequence, LAYERS).hidden, exact.hidden, atol=2e-2, rtol=2e-2)  # rewritten, now read
    assert again.loaded == 1 and again.computed == 0
    assert TargetFeatures(target, cache).fill(sequences, LAYERS)["computed"] == 0


def test_two_writers_of_the_same_key_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Two processes filling the same sequences write the same keys: each goes through a temporary
    file of its own (the old shared ``<key>.tmp`` let the second writer's rename fail or a reader
    meet a half-written file), and the file that stays is a whole one."""
    path = tmp_path / f"{'a' * 40}.pt"
    first, second = {"layers": [0], "which": torch.tensor(1)}, {"layers": [0], "which": torch.tensor(2)}
    replace, nested, temporaries = os.replace, [], []

    def interleaved(source, destination):  # the other writer saves and renames between this one's save and rename
        temporaries.append(os.path.basename(source))
        if not nested:
            nested.append(True)
            features_module._write(path, second)
        replace(source, destination)

    monkeypatch.setattr(features_module.os, "replace", interleaved)
    features_module._write(path, first)
    assert len(set(temporaries)) == 2 and all(str(os.getpid()) in name for name in temporaries)
    assert int(torch.load(path, weights_only=True)["which"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.skipif(features_module.fcntl is None, reason="no advisory file locks on this platform")
def test_writers_share_the_lock_and_a_prune_holds_it_alone(filled, monkeypatch):
    """A cache file is written under the cache's lock held shared (other writers go on), and a
    prune or rewrite holds it exclusively for its whole run (writers of training runs wait)."""
    import fcntl

    import modeling_dflare.training.cache as cache_module

    target, tokenizer, sequences, cache = filled

    def try_lock(mode) -> bool:
        with open(cache / ".lock", "a+b") as handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    seen = {}
    write = features_module._write

    def watched_write(path, payload):
        seen["writer: another writer may write"] = try_lock(fcntl.LOCK_SH)
        seen["writer: a prune may start"] = try_lock(fcntl.LOCK_EX)
        return write(path, payload)

    monkeypatch.setattr(features_module, "_write", watched_write)
    (cache / f"{cache_key(sequences[0].input_ids)}.pt").unlink()
    TargetFeatures(target, cache, tokenizer=tokenizer, max_length=32).fill(sequences, LAYERS)
    compact = cache_module._compact

    def watched_compact(*args):
        seen["prune: a writer may write"] = try_lock(fcntl.LOCK_SH)
        return compact(*args)

    monkeypatch.setattr(cache_module, "_compact", watched_compact)
    compact_cache(cache, "fp8")
    assert seen == {"writer: another writer may write": True, "writer: a prune may start": False, "prune: a writer may write": False}
    assert read_manifest(cache)["storage"] == "fp8"


def test_pruning_with_the_defaults_keeps_what_training_at_another_max_length_filled(filled, tmp_path, monkeypatch, capsys):
    """``dflare cache --keep-data`` after a training run at --max-length 32 (``dflare train``'s and
    ``dflare cache``'s defaults used to differ, 512 and 768): it prunes with the manifest's length
    and keeps every file of the data; a --max-length the manifest does not record is refused."""
    _, tokenizer, sequences, cache = filled
    monkeypatch.setattr("modeling_dflare.targets.load_tokenizer", lambda source=None, prompt_format=None: tokenizer)
    before = sorted(p.name for p in cache.glob("*.pt"))
    assert dflare_cli.main(["cache", str(cache), "--keep-data", str(tmp_path / "data.jsonl"), "--storage", "bf16"]) == 0
    assert "0 (0 MiB) were deleted" in capsys.readouterr().out
    assert sorted(p.name for p in cache.glob("*.pt")) == before
    assert keep_keys(cache, [str(tmp_path / "data.jsonl")], tokenizer) == {cache_key(s.input_ids) for s in sequences}
    assert dflare_cli.main(["cache", str(cache), "--keep-data", str(tmp_path / "data.jsonl"), "--max-length", "768"]) == 2
    error = capsys.readouterr().err
    assert "--max-length 768 disagrees with" in error and "filled at --max-length [32]" in error
    assert sorted(p.name for p in cache.glob("*.pt")) == before


def test_pruning_with_another_tokenizer_is_refused(filled, tmp_path):
    _, _, _, cache = filled
    other = tiny_tokenizer(words=("hello",))
    with pytest.raises(CacheMismatchError, match="tokenizes differently"):
        keep_keys(cache, [str(tmp_path / "data.jsonl")], other)


@pytest.mark.parametrize("layout", ["notes-and-a-pt", "foreign-manifest", "empty"])
def test_a_folder_that_is_not_a_cache_is_refused_and_left_alone(tmp_path, layout, capsys):
    """``dflare cache`` on a folder that is no cache (a model folder with a .pt file, a folder with
    another tool's manifest.json, an empty folder) refuses in one line and changes no file."""
    folder = tmp_path / "folder"
    folder.mkdir()
    if layout == "notes-and-a-pt":
        (folder / "notes.txt").write_text("mine")
        torch.save({"weights": torch.ones(3)}, folder / "model.pt")
        torch.save({"weights": torch.ones(3)}, folder / f"{'b' * 40}.pt")
    elif layout == "foreign-manifest":
        (folder / "manifest.json").write_text(json.dumps({"name": "another tool"}))
        torch.save({"weights": torch.ones(3)}, folder / f"{'b' * 40}.pt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CacheMismatchError, match="not a (hidden-state )?cache"):
        compact_cache(folder, "fp8")
    with pytest.raises(CacheMismatchError, match="not a (hidden-state )?cache"):
        keep_keys(folder, [], tiny_tokenizer(), 64)
    assert dflare_cli.main(["cache", str(folder), "--storage", "bf16"]) == 2
    assert "not a" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_cache_from_before_manifests_needs_an_explicit_max_length_to_prune(tmp_path):
    """A cache written before manifests existed is still a cache (cache files and nothing else), but
    the max length that made its keys is unknown: pruning asks for it instead of guessing."""
    target, tokenizer = tiny_target("llama", seed=0), tiny_tokenizer()
    write_jsonl(tmp_path / "data.jsonl", _records(3))
    sequences, _ = tokenize_conversations(tokenizer, read_source(str(tmp_path / "data.jsonl")), 32)
    cache = tmp_path / "cache"
    TargetFeatures(target, cache, storage="bf16").fill(sequences, LAYERS)
    (cache / "manifest.json").unlink()
    (cache / ".lock").unlink(missing_ok=True)
    with pytest.raises(CacheMismatchError, match="pass --max-length"):
        keep_keys(cache, [str(tmp_path / "data.jsonl")], tokenizer)
    assert keep_keys(cache, [str(tmp_path / "data.jsonl")], tokenizer, 32) == {cache_key(s.input_ids) for s in sequences}
    assert compact_cache(cache, "fp8")["rewritten"] == 3


@pytest.mark.skipif(features_module.fcntl is None, reason="no advisory file locks on this platform")
def test_a_writer_waits_for_a_prune_to_finish(filled):
    """Across threads (each with its own lock file handle, as two processes have): a training run's
    write started while a prune holds the lock lands only after the prune released it."""
    target, _, sequences, cache = filled
    path = cache / f"{cache_key(sequences[0].input_ids)}.pt"
    path.unlink()
    features = TargetFeatures(target, cache)
    writer = threading.Thread(target=features, args=(sequences[0], LAYERS))
    with features_module.cache_lock(cache, exclusive=True):  # what a prune holds
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not path.exists()  # computed, but waiting to write
    writer.join()
    assert path.exists() and features.computed == 1
