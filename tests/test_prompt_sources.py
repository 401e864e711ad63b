"""The math and code prompt sources (reasoning-gym's GSM-Symbolic and CodeI/O), read from the real
installed package: reproducible ids and text, held-out splits by id, no benchmark prompt among them."""

import collections
import importlib.util
import re
from pathlib import Path

import pytest

from modeling_dflare import prompt_sources
from modeling_dflare.bench_datasets import CHAMP_INSTRUCTION, HUMANEVAL_INSTRUCTION, iter_prompts
from modeling_dflare.conversations import SOURCES, source_reader
from modeling_dflare.data import read_conversations, read_jsonl, read_sharegpt, split_conversations

#: every named source but ShareGPT (read on its own below): this module's and the instruction sources
PROMPT_SOURCE_NAMES = [name for name in SOURCES if name != "sharegpt"]

#: the answers regenerated from the training sources (and their held-out splits) in the repository
DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
#: standard-set questions and training texts are compared as lowercase runs of letters and digits ...
WORD = re.compile(r"[a-z0-9]+")
#: ... by the word 8-grams they share
OVERLAP_NGRAM = 8
#: a question copied into a training prompt shares all of its 8-grams; the most any standard question
#: shares today is a stock phrase of a short problem ("positive integer solutions to the equation
#: x^2+y^2+z^2 ...": 3 of 8), and a few percent for the rest
MAX_SHARED = 0.5


def test_gsm_symbolic_is_reproducible_and_varied():
    first, report = prompt_sources.read_gsm_symbolic(count=200, seed=0)
    again, _ = prompt_sources.read_gsm_symbolic(count=200, seed=0)
    other, _ = prompt_sources.read_gsm_symbolic(count=200, seed=1)
    assert report.kept == len(first) == 200 and report.dropped == 0
    assert [c.messages for c in first] == [c.messages for c in again]  # the same problems on every run
    assert first[7].id == "gsm-symbolic/0/7" and other[7].id == "gsm-symbolic/1/7"
    texts = {c.messages[0]["content"] for c in first}
    assert len(texts) == 200  # fresh names and numbers: no two problems alike
    assert len(texts & {c.messages[0]["content"] for c in other}) < 5
    assert all(len(c.messages) == 1 and c.messages[0]["role"] == "user" for c in first)


def test_codeio_tasks_are_unique_function_prompts():
    conversations, report = prompt_sources.read_codeio()
    assert report.kept == len(conversations) > 2500
    assert report.skipped["repeats an earlier task"] > 0  # the two files overlap: each task is kept once
    assert len({c.id for c in conversations}) == len(conversations)
    contents = [c.messages[0]["content"] for c in conversations]
    assert len(set(contents)) == len(contents)
    assert all("main_solution" in text for text in contents)
    stub = next(text for text in contents if text.startswith("Implement this Python function"))
    assert '```python\ndef main_solution(' in stub and '    """' in stub


def test_no_benchmark_prompt_is_a_training_prompt():
    """Neither source holds a benchmark prompt: HumanEval's problems and the generated arithmetic set."""
    sources = (prompt_sources.read_codeio, prompt_sources.read_pystubs, prompt_sources.read_pylibs)
    code = "\n".join(c.messages[0]["content"] for source in sources for c in source()[0])
    math, _ = prompt_sources.read_gsm_symbolic(count=2000)
    math_text = "\n".join(c.messages[0]["content"] for c in math)
    humaneval = iter_prompts("humaneval")
    for _ in range(164):
        problem = next(humaneval).meta["problem"]
        longest = max(problem["prompt"].splitlines(), key=lambda line: len(line.strip())).strip()
        assert longest not in code, (problem["task_id"], longest)
    bench_math = iter_prompts("math")
    for _ in range(200):
        problem_text = next(bench_math).messages[0]["content"].split("\n\n", 1)[1]
        assert problem_text not in math_text
    # and the benchmark's instructions are not the training prompts' wording
    assert "Complete this Python function" not in code and "End with a line 'Answer:" not in math_text


def standard_set_questions() -> list[tuple[str, str]]:
    """(id, question) of every prompt of the benchmark's standard sets: MT-Bench's first turns,
    HumanEval's problems and CHAMP's, each without the instruction the benchmark wraps it in."""
    return (
        [(p.id, p.messages[-1]["content"]) for p in iter_prompts("mtbench")]
        + [(p.id, p.meta["problem"]["prompt"]) for p in iter_prompts("humaneval")]
        + [(p.id, p.meta["problem"]) for p in iter_prompts("champ")]
    )


def training_and_tuning_texts():
    """(source, text) of every message a training or tuning prompt can hold: each prompt source as
    ``dflare regenerate`` reads it; all of ShareGPT, every turn (its held-out tune half steers tuning,
    and later turns' prompts carry the earlier replies); and the prompts (all but the answer) of the
    regenerated answers under datasets/, training and held-out."""
    for name in PROMPT_SOURCE_NAMES:
        for conversation in source_reader(name)()[0]:
            for message in conversation.messages:
                yield name, message["content"]
    for conversation in read_sharegpt()[0]:
        for message in conversation.messages:
            yield "sharegpt", message["content"]
    files = [path for pattern in ("*/train*/*.jsonl.gz", "*/train*/*.jsonl", "*/heldout/*.jsonl.gz", "*/heldout/*.jsonl")
             for path in sorted(DATASETS_DIR.glob(pattern))]
    assert files, f"no regenerated answers under {DATASETS_DIR}"
    for path in files:
        for conversation in read_jsonl(path)[0]:
            messages = conversation.messages
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            for message in prompt:
                yield f"{path.parent.parent.name}/{path.parent.name}", message["content"]


def test_no_training_or_tuning_prompt_overlaps_the_standard_sets():
    """No training or tuning text holds a standard-set question (MT-Bench, HumanEval, CHAMP) or
    much of one: at most :data:`MAX_SHARED` of a question's word 8-grams appear in any of them, a
    question under 8 words appears in none, and neither benchmark instruction is any prompt's wording."""
    questions = standard_set_questions()
    assert len(questions) == 80 + 164 + 270
    own, short, holders = [], {}, {}
    for index, (_, text) in enumerate(questions):
        words = WORD.findall(text.lower())
        grams = set(zip(*(words[k:] for k in range(OVERLAP_NGRAM))))
        own.append(grams)
        if not grams:
            short[index] = f" {' '.join(words)} "
        for gram in grams:
            holders.setdefault(gram, []).append(index)
    instructions = [HUMANEVAL_INSTRUCTION.split("\n")[0], CHAMP_INSTRUCTION.split("\n")[0]]
    shared = [set() for _ in questions]
    where = [collections.Counter() for _ in questions]
    sources, worded = collections.Counter(), []
    for source, text in training_and_tuning_texts():
        sources[source] += 1
        words = WORD.findall(text.lower())
        for gram in holders.keys() & set(zip(*(words[k:] for k in range(OVERLAP_NGRAM)))):
            for index in holders[gram]:
                shared[index].add(gram)
                where[index][source] += 1
        joined = f" {' '.join(words)} "
        for index, question in short.items():
            if question in joined:
                shared[index].add(question)
                where[index][source] += 1
        worded += [(source, instruction) for instruction in instructions if instruction in text]
    assert set(PROMPT_SOURCE_NAMES) | {"sharegpt"} <= set(sources)  # every source was read
    assert not worded, worded[:5]
    assert not [questions[index][0] for index in short if shared[index]], "a short question appears in a training text"
    fractions = sorted(
        ((len(shared[i]) / len(own[i]), questions[i][0], dict(where[i])) for i in range(len(questions)) if own[i]), reverse=True
    )
    assert fractions[0][0] <= MAX_SHARED, fractions[:5]
    total = sum(len(grams) for grams in own)
    assert sum(len(shared[i]) for i in range(len(questions)) if own[i]) / total < 0.02  # the sets as a whole: next to nothing


def test_named_sources_read_through_read_conversations_and_split_by_id():
    conversations, report = read_conversations("codeio")
    train, heldout = split_conversations(conversations)
    assert report.source.startswith("codeio") and len(train) + len(heldout) == len(conversations)
    assert 0 < len(heldout) < 0.05 * len(conversations)
    train_again, heldout_again = split_conversations(read_conversations("codeio")[0])
    assert [c.id for c in heldout] == [c.id for c in heldout_again]


def test_missing_package_names_the_install_command(monkeypatch):
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "reasoning_gym", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "reasoning_gym" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps reasoning-gym"):
        prompt_sources.read_codeio()


def test_regenerate_rejects_an_unknown_source_naming_the_choices(tmp_path):
    from dflare_cli import main

    with pytest.raises(FileNotFoundError, match="gsm-symbolic"):
        main(["--debug", "regenerate", "--data", "mathh", "--output-dir", str(tmp_path / "out")])


def test_pystubs_are_stdlib_signatures_and_docstrings_to_implement():
    conversations, report = prompt_sources.read_pystubs()
    again, _ = prompt_sources.read_pystubs()
    assert report.kept == len(conversations) > 1000 and report.source.startswith("pystubs (Python 3.")
    assert [c.messages for c in conversations] == [c.messages for c in again]  # same Python, same prompts
    assert len({c.id for c in conversations}) == len(conversations)
    assert all(c.id.startswith("pystubs/") for c in conversations)
    assert not any(part in ("test", "tests", "idle_test") for c in conversations for part in c.id.split("/")[1:-2])  # no test folder
    by_id = {c.id: c.messages[0]["content"] for c in conversations}
    glob = by_id["pystubs/glob.py/glob"]
    assert "```python\ndef glob(pathname, *, root_dir=None" in glob and '    """\n    Return a list of paths' in glob
    method = next(text for cid, text in by_id.items() if cid.startswith("pystubs/inspect.py/Signature."))
    assert "```python\nclass Signature:\n    def " in method and "method" in method.split("\n", 1)[0]
    assert {text.split("\n", 1)[0].split("`")[0] for text in by_id.values()} >= {"Implement this Python function:", "Fill in the implementation of "}
    train, heldout = split_conversations(conversations)
    assert 0 < len(heldout) < 0.05 * len(conversations)


def test_pystubs_keep_public_documented_short_functions_outside_tests(tmp_path, caplog):
    doc = "Return the thing, " + "described at length " * 4
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'def kept(a: int, b=2) -> int:\n    """{doc}"""\n    return a + b\n\n'
        f'def _private(a):\n    """{doc}"""\n    return a\n\n'
        'def terse(a):\n    """Too short."""\n    return a\n\n'
        f'def only_a_docstring(a):\n    """{doc}and more"""\n\n'
        f'class Box:\n    def open(self):\n        """{doc}for boxes"""\n        return self\n\n'
        f'def repeated(a):\n    """{doc}"""\n    return a\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "helpers.py").write_text(f'def helper():\n    """{doc}in a test folder"""\n    return 1\n')
    (tmp_path / "broken.py").write_text("print 'python 2'\n")
    with caplog.at_level("INFO", logger="modeling_dflare.prompt_sources"):
        conversations, report = prompt_sources.read_pystubs(tmp_path)
    assert "1 standard-library file(s) this Python cannot parse were left out (e.g. broken.py)" in caplog.text
    assert [c.id for c in conversations] == ["pystubs/pkg/mod.py/kept", "pystubs/pkg/mod.py/Box.open"]
    assert "def kept(a: int, b=2) -> int:\n    \"\"\"\n    Return the thing," in conversations[0].messages[0]["content"]
    assert "class Box:\n    def open(self):\n        \"\"\"\n        Return the thing," in conversations[1].messages[0]["content"]
    assert report.skipped == {"docstring under 80 characters": 1, "no body, or over 60 lines": 1, "repeats an earlier function": 1}


def test_pylibs_are_installed_library_functions_named_by_package_and_version():
    conversations, report = prompt_sources.read_pylibs()
    again, _ = prompt_sources.read_pylibs()
    assert [(c.id, c.messages) for c in conversations] == [(c.id, c.messages) for c in again]
    assert report.kept == len(conversations) > 1000 and len({c.id for c in conversations}) == len(conversations)
    from importlib.metadata import version

    assert report.source == "pylibs (" + ", ".join(f"{p} {version(p)}" for p in prompt_sources.PYLIBS_PACKAGES) + ")"
    packages = {c.id.split("/")[1] for c in conversations}
    assert packages == set(prompt_sources.PYLIBS_PACKAGES)
    assert not any(part in ("test", "tests") for c in conversations for part in c.id.split("/")[2:-1])
    by_id = {c.id: c.messages[0]["content"] for c in conversations}
    assert not any(cid.startswith("pystubs/") for cid in by_id)  # the standard library is pystubs' share
    shortest_path = by_id["pylibs/networkx/algorithms/shortest_paths/generic.py/has_path"]
    assert "```python\ndef has_path(G, source, target):\n    \"\"\"" in shortest_path
    # appending a package keeps every earlier id and prompt (the committed answers stay valid)
    fewer, _ = prompt_sources.read_pylibs(prompt_sources.PYLIBS_PACKAGES[:2])
    assert [(c.id, c.messages) for c in fewer] == [(c.id, c.messages) for c in conversations[: len(fewer)]]
    train, heldout = split_conversations(conversations)
    assert 0 < len(heldout) < 0.05 * len(conversations)


def test_pylibs_names_a_package_that_is_not_installed():
    with pytest.raises(FileNotFoundError, match="'no_such_pkg_xyz', which is not installed"):
        prompt_sources.read_pylibs(("networkx", "no_such_pkg_xyz"))


def test_every_prompt_source_has_a_model_card_line():
    """A draft trained on a source the card table lacks would publish a card that leaves it out."""
    from modeling_dflare.training.sequences import prompt_source_of
    from modeling_dflare.training.card import PROMPT_SOURCE_CARDS

    assert set(SOURCES) == set(PROMPT_SOURCE_CARDS)
    assert prompt_source_of("pylibs/numpy/lib/_function_base_impl.py/median") == "pylibs"
