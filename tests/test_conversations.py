"""Conversation records, read reports and the one registry of named sources."""

import pytest

from modeling_dflare import data, prompt_sources
from modeling_dflare.conversations import SOURCES, Conversation, ReadReport, source_reader


def test_prompts_keep_system_turns_and_drop_replies_before_the_first_user_turn():
    chat = Conversation("c", [
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ])
    assert chat.first_prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    assert chat.prompt_at(2) == chat.messages[1:]
    assert chat.prompt_at(3) is None
    with pytest.raises(ValueError, match="turn 0: expected 1 or more"):
        chat.prompt_at(0)
    with pytest.raises(ValueError, match="'silent' has no user turn"):
        Conversation("silent", [{"role": "assistant", "content": "x"}]).first_prompt


def test_report_counts_what_was_skipped_by_reason():
    report = ReadReport("file.jsonl", kept=3)
    for reason in ("unknown role", "unknown role", "invalid JSON line"):
        report.skip(reason)
    assert report.dropped == 3
    assert report.summary() == "file.jsonl: kept 3 conversations, dropped 3 (2 unknown role, 1 invalid JSON line)"


def test_every_named_source_resolves_to_its_reader():
    assert source_reader("sharegpt") is data.read_sharegpt
    assert source_reader("codeio") is prompt_sources.read_codeio
    assert all(callable(source_reader(name)) for name in SOURCES)
    with pytest.raises(ValueError, match=r"data source 'mathh': expected one of \[.*'gsm-symbolic'"):
        source_reader("mathh")


def test_both_dispatchers_read_a_named_source_through_the_registry(monkeypatch):
    """``--data NAME`` means the same source to the reader of conversations and to training's reader."""
    from modeling_dflare.training.sequences import prompt_source_of, read_source

    chats = [Conversation("codeio/t/0", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])]
    monkeypatch.setattr(prompt_sources, "read_codeio", lambda: (chats, ReadReport("stub", kept=1)))
    assert data.read_conversations("codeio")[0] is chats
    assert [c.id for c in read_source("codeio")] == ["codeio/t/0"]
    assert prompt_source_of("codeio/t/0") == "codeio"
    assert prompt_source_of("no-such-source/1", "other") == "other"
