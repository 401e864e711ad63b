"""``dflare regenerate``'s answer files: packing never overwrites a part, a torn line names its file,
and ``dflare tune-cut``'s rewrite of a draft's files goes through a temporary file."""

import gzip
import json
import os

import pytest

from modeling_dflare.data import write_jsonl
from modeling_dflare.regenerate import AnswerFileError, done_ids, pack_shards, read_regenerated


def _answers(ids) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"answer {i}"}]} for i in ids]


def _part_ids(part) -> list[str]:
    with gzip.open(part, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["id"] for line in handle if line.strip()]


def test_pack_numbers_after_the_highest_part_and_never_overwrites_one(tmp_path):
    """Parts numbered with a gap (part-00000 and part-00002, the middle one removed or never
    committed): the next pack is part-00003. Numbered by the count of parts it would be part-00002,
    and the answers packed there would be lost."""
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers(["a"]))
    first = pack_shards(tmp_path)
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers(["b"]))
    second = pack_shards(tmp_path)
    assert (first.name, second.name) == ("part-00000.jsonl.gz", "part-00001.jsonl.gz")
    second.rename(tmp_path / "part-00002.jsonl.gz")  # a gap at 1: counting the parts gives 2, which exists
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers(["c"]))
    third = pack_shards(tmp_path)
    assert third.name == "part-00003.jsonl.gz"
    assert _part_ids(tmp_path / "part-00002.jsonl.gz") == ["b"] and _part_ids(third) == ["c"]
    assert done_ids(tmp_path) == {"a", "b", "c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl.gz", "part-00002.jsonl.gz", "part-00003.jsonl.gz"]


def test_pack_keeps_answers_holding_unicode_line_separators(tmp_path):
    """An answer may hold U+2028, U+2029 or U+0085 (written raw: ``ensure_ascii=False``). Records end
    at "\\n" only; packing must not cut such a record in two and refuse the folder."""
    text = "first line\u2028second\u2029third\x85fourth"
    records = [{"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]}]
    write_jsonl(tmp_path / "shard-00000.jsonl", records + _answers(["y"]))
    assert "\u2028" in (tmp_path / "shard-00000.jsonl").read_text(encoding="utf-8")
    part = pack_shards(tmp_path)
    assert _part_ids(part) == ["x", "y"]
    assert read_regenerated(tmp_path)[0].messages[1]["content"] == text


def test_pack_skips_a_part_name_another_packer_claimed(tmp_path, monkeypatch):
    """Two packers of one folder: the part name the other took between this one's look at the
    folder and its rename is skipped, not replaced."""
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers(["a"]))
    real_open, claimed = os.open, []

    def other_packer_first(path, flags, *args):
        if str(path).endswith("part-00000.jsonl.gz") and not claimed:
            claimed.append(path)
            with gzip.open(path, "wt") as handle:  # the other packer's part lands first
                handle.write(json.dumps(_answers(["other"])[0]) + "\n")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", other_packer_first)
    part = pack_shards(tmp_path)
    assert part.name == "part-00001.jsonl.gz" and _part_ids(tmp_path / "part-00000.jsonl.gz") == ["other"]
    assert _part_ids(part) == ["a"]


@pytest.mark.parametrize("where", ["shard", "part"])
def test_a_torn_line_names_its_file_and_line(tmp_path, where):
    """A line cut short (a disk that filled, a copy that stopped) is an error naming the file and the
    line, not a bare JSONDecodeError; packing refuses to fold such a shard and removes nothing."""
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers(["a", "b"]))
    good = (tmp_path / "shard-00000.jsonl").read_text()
    torn = good + '{"id": "c", "messages": [{"role": "us'
    if where == "part":
        with gzip.open(tmp_path / "part-00000.jsonl.gz", "wt") as handle:
            handle.write(torn)
        (tmp_path / "shard-00000.jsonl").unlink()
        name = "part-00000.jsonl.gz"
    else:
        (tmp_path / "shard-00000.jsonl").write_text(torn)
        name = "shard-00000.jsonl"
    with pytest.raises(AnswerFileError, match=rf"{name}, line 3: not a JSON record"):
        done_ids(tmp_path)
    with pytest.raises(ValueError, match=rf"{name}, line 3"):
        read_regenerated(tmp_path)
    if where == "shard":
        with pytest.raises(AnswerFileError, match=r"shard-00000.jsonl, line 3: .*nothing was packed"):
            pack_shards(tmp_path)
        assert (tmp_path / "shard-00000.jsonl").read_text() == torn and not list(tmp_path.glob("part-*"))


def test_a_part_cut_short_names_its_file(tmp_path):
    write_jsonl(tmp_path / "shard-00000.jsonl", _answers([f"a{i}" for i in range(50)]))
    part = pack_shards(tmp_path)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a copy that stopped halfway
    with pytest.raises(AnswerFileError, match=r"part-00000.jsonl.gz, line \d+: "):
        done_ids(tmp_path)


def test_tune_cut_rewrites_config_json_through_a_temporary_file(tmp_path, monkeypatch):
    """``dflare tune-cut`` writes the chosen values into config.json (and the summary) through a
    temporary file of its own process and a rename: an interruption while writing leaves the
    previous config.json whole, never a torn one."""
    from modeling_dflare.training import tune

    folder = tmp_path / "draft"
    folder.mkdir()
    original = {"model_type": "dflare", "confidence_threshold": 0.15, "block_size": 16}
    (folder / "config.json").write_text(json.dumps(original))
    tuning = {"best": 0.3}
    real_replace = os.replace

    def interrupted(source, destination):
        assert str(os.getpid()) in os.path.basename(source) and os.path.dirname(source) == str(folder)
        raise KeyboardInterrupt  # killed between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune._write_back(folder, None, tuning, 0.15)
    assert json.loads((folder / "config.json").read_text()) == original
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no temporary file left behind
    monkeypatch.setattr(os, "replace", real_replace)
    tune._write_back(folder, None, tuning, 0.15)
    assert json.loads((folder / "config.json").read_text()) == {**original, "confidence_threshold": 0.3}
