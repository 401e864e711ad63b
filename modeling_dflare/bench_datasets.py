"""Benchmark prompt sets: HumanEval, the report half of the held-out ShareGPT split, and
reproducible math word problems. No training or tuning step reads any of them.

Each loader yields :class:`BenchPrompt` records in a fixed order, so ``--num-prompts N`` always picks
the same prompts (the benchmark skips prompts longer than its token limit and takes the next).
Loaders are registered in :data:`DATASETS`; heavy files are read only when a loader runs.

No math benchmark is installable offline here, so ``math`` is generated: arithmetic word problems
from a handful of templates, each drawn from its own seeded RNG (problem ``i`` is the same on every
machine and run, whatever the prompt count). Each record carries the exact answer.
"""

import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any

from .data import humaneval_problems, read_sharegpt, split_conversations, split_heldout

HUMANEVAL_INSTRUCTION = "Complete this Python function:\n```python\n{prompt}```"
MATH_INSTRUCTION = "Solve this problem step by step. End with a line 'Answer: <number>'.\n\n{problem}"


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


DATASETS: dict[str, Callable[[], Iterator[BenchPrompt]]] = {"humaneval": humaneval, "sharegpt": sharegpt, "math": math}


def iter_prompts(name: str) -> Iterator[BenchPrompt]:
    """Prompts of dataset ``name`` (one of :data:`DATASETS`) in their fixed order."""
    if name not in DATASETS:
        raise ValueError(f"unknown benchmark dataset {name!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[name]()


__all__ = ["BenchPrompt", "DATASETS", "iter_prompts", "math_problem"]
