"""Domain prompt sources for regeneration: grade-school math and Python coding tasks.

ShareGPT is mostly conversation; a draft trained on it alone meets code and math with the habits of
chat. These sources add prompts of those two kinds from the ``reasoning-gym`` package (Apache-2.0,
installed with ``pip install --no-deps reasoning-gym``: its data files and generators need none of
its dependencies):

- ``gsm-symbolic``: GSM-Symbolic (Mirzadeh et al., 2024) as reasoning-gym ships it: grade-school
  word problems from GSM8K turned into templates with fresh names and numbers. Problem ``i`` of
  seed ``s`` is the same on every machine (``gsm-symbolic/<s>/<i>``).
- ``codeio``: the task descriptions and input/output specifications of CodeI/O (Li et al., 2025)
  as reasoning-gym ships them (both of its files, about 5,700 tasks), each asked as a Python
  function to write (``codeio/<file>/<index>``).
- ``pystubs``: the public functions and methods of the running Python's own standard library that
  have a docstring and a short body, asked as the signature and docstring to implement
  (``pystubs/<file>/<qualified name>``; PSF licence, nothing to install): named functions with
  their own arguments and docstrings, the shape of a HumanEval problem, where every CodeI/O prompt
  is one ``main_solution`` documented by a task description.
- ``pylibs``: the same for the pure-Python libraries installed with this project's dependencies
  (networkx, numpy, mpmath, packaging, jinja2; ``pylibs/<package>/<file>/<qualified name>``,
  each under its own BSD-style licence): more HumanEval-shaped prompts once the standard library's
  are all answered.

None overlaps the benchmark: the standard sets' questions (MT-Bench, HumanEval, CHAMP) and the
benchmark's own generated arithmetic problems (:mod:`modeling_dflare.bench_datasets`) are never
among them (tests/test_prompt_sources.py compares their word 8-grams), and the instructions are
worded differently from the benchmark's. The answers are the target's own (``dflare regenerate
--data gsm-symbolic``), so only the questions come from these sources. Each is a named source of
:data:`modeling_dflare.conversations.SOURCES`.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import logging
import random
import re
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

from .conversations import Conversation, ReadReport

logger = logging.getLogger(__name__)

#: how many GSM-Symbolic problems ``--data gsm-symbolic`` offers (a fixed, reproducible pool)
GSM_SYMBOLIC_POOL = 20_000

MATH_INSTRUCTIONS = (
    "{question}",
    "Solve this word problem step by step.\n\n{question}",
    "{question}\nExplain your reasoning and give the final answer.",
    "Please work out the answer to this question, showing each step:\n{question}",
)
CODE_INSTRUCTIONS = (
    "Implement this Python function:\n```python\n{stub}```",
    "Write the body of the following function.\n\n```python\n{stub}```",
    "Write a Python function `{name}({args})` for this task.\n\n{task}\n\n{spec}",
    "{task}\n\n{spec}\n\nWrite the solution in Python as a function named `{name}`.",
)


def reasoning_gym_root() -> Path:
    """Folder of the installed ``reasoning_gym`` package, found without importing it (its
    ``__init__`` imports every task and their dependencies; these sources need none of them)."""
    if "reasoning_gym" in sys.modules:  # imported, or registered bare by gsm_symbolic_generators
        return Path(list(sys.modules["reasoning_gym"].__path__)[0])
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'gsm-symbolic' and 'codeio' prompt sources need the 'reasoning-gym' package: "
            "pip install --no-deps reasoning-gym==0.1.25"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_file_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gsm_symbolic_generators() -> list:
    """reasoning-gym's GSM-Symbolic generators that it marks as working (``tasks_ok``), in order.

    The generator files import only ``reasoning_gym.utils``; the package is registered as a bare
    namespace (without running its ``__init__``) when it is not imported already."""
    root = reasoning_gym_root()
    if "reasoning_gym" not in sys.modules:
        package = types.ModuleType("reasoning_gym")
        package.__path__ = [str(root)]
        sys.modules["reasoning_gym"] = package
    folder = root / "arithmetic" / "gsm_symbolic"
    generators = {}
    for stem in ("generators_00_49", "generators_50_99"):
        module = _load_file_module(f"_dflare_gsm_symbolic_{stem}", folder / f"{stem}.py")
        generators.update({int(n.split("_")[1]): getattr(module, n) for n in dir(module) if n.startswith("generate_")})
    source = (folder / "gsm_symbolic.py").read_text()
    ok = [int(n) for n in re.search(r"tasks_ok = \[(.*?)\]", source, re.S).group(1).replace(",", " ").split()]
    return [generators[n] for n in ok if n in generators]


def read_gsm_symbolic(count: int = GSM_SYMBOLIC_POOL, seed: int = 0) -> tuple[list[Conversation], ReadReport]:
    """``count`` GSM-Symbolic problems as one-turn chats, ids ``gsm-symbolic/<seed>/<i>``."""
    generators = gsm_symbolic_generators()
    report = ReadReport(f"gsm-symbolic (reasoning-gym, seed {seed})")
    conversations = []
    for index in range(count):
        rng = random.Random(f"dflare-gsm-symbolic-{seed}-{index}")
        try:
            question = generators[rng.randrange(len(generators))](rng, 1.0)["question"].strip()
        except (ValueError, ZeroDivisionError, IndexError) as error:  # a template that found no valid numbers
            report.skip(f"generator failed ({type(error).__name__})")
            continue
        content = MATH_INSTRUCTIONS[index % len(MATH_INSTRUCTIONS)].format(question=question)
        conversations.append(Conversation(f"gsm-symbolic/{seed}/{index}", [{"role": "user", "content": content}]))
        report.kept += 1
    logger.info(report.summary())
    return conversations, report


def _code_prompt(record: dict, variant: int) -> str | None:
    match = re.search(r"^def (main_solution)\((.*?)\):", record.get("code_sample", ""), re.M | re.S)
    task, spec = record.get("task_description", "").strip(), record.get("input_output_spec", "").strip()
    if match is None or not task:
        return None
    name, args = match.group(1), " ".join(match.group(2).split())
    doc = "\n".join(("    " + line).rstrip() for line in f"{task}\n\n{spec}".splitlines())
    stub = f'def {name}({args}):\n    """\n{doc}\n    """\n'
    return CODE_INSTRUCTIONS[variant % len(CODE_INSTRUCTIONS)].format(stub=stub, name=name, args=args, task=task, spec=spec)


#: wording of the ``pystubs`` prompts, taken in turn (never the benchmark's "Complete this Python function")
STUB_INSTRUCTIONS = (
    "Implement this Python {kind}:\n```python\n{stub}```",
    "Write the body of the following {kind}.\n\n```python\n{stub}```",
    "Here is a {kind} signature and its docstring. Write the code.\n\n```python\n{stub}```",
    "Fill in the implementation of `{name}`:\n\n```python\n{stub}```",
)
#: ``pystubs`` keeps a function whose docstring has at least this many characters ...
STUB_MIN_DOC = 80
#: ... and whose definition spans at most this many lines (a body a small model can write)
STUB_MAX_LINES = 60
#: standard-library folders that hold tests, not library code
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _stub(node: ast.FunctionDef, doc: str, owner: str | None) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    indent = "    " if owner else ""
    body = textwrap.indent(f'"""\n{doc}\n"""', indent + "    ", lambda line: line.strip() != "")
    stub = f"{indent}def {node.name}({ast.unparse(node.args)}){returns}:\n{body}\n"
    return f"class {owner}:\n{stub}" if owner else stub


def stdlib_functions(root: Path | None = None, unparsable: list[str] | None = None) -> list[tuple[str, ast.FunctionDef, str | None]]:
    """(path relative to ``root``, definition, class name or None) of every public function and
    method (not nested deeper) in the ``.py`` files under ``root`` (default: this Python's standard
    library), test folders left out, in path order. Files this Python cannot parse are left out;
    their relative paths go into ``unparsable`` when a list is given."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith("test_") for part in relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. lib2to3's Python 2 fixtures
            if unparsable is not None:
                unparsable.append(relative.as_posix())
            continue
        for node in tree.body:
            members = [(node, None)] if isinstance(node, ast.FunctionDef) else []
            if isinstance(node, ast.ClassDef):
                members = [(member, node.name) for member in node.body if isinstance(member, ast.FunctionDef)]
            found += [(relative.as_posix(), member, owner) for member, owner in members if not member.name.startswith("_")]
    return found


def _stub_chats(prefix: str, functions, report: ReadReport, seen_docs: set[str], conversations: list[Conversation]) -> None:
    """Append an "implement this signature and docstring" chat for each ``(relative path, definition,
    class name)`` of ``functions`` that has a docstring of at least :data:`STUB_MIN_DOC` characters not
    seen before and a short body, id ``<prefix>/<relative path>/<qualified name>``; count the rest."""
    seen_ids = {c.id for c in conversations}
    for relative, node, owner in functions:
        doc = ast.get_docstring(node)
        if not doc or len(doc) < STUB_MIN_DOC:
            report.skip(f"docstring under {STUB_MIN_DOC} characters")
            continue
        if len(node.body) < 2 or node.end_lineno - node.lineno > STUB_MAX_LINES:
            report.skip(f"no body, or over {STUB_MAX_LINES} lines")
            continue
        conversation_id = f"{prefix}/{relative}/{owner + '.' if owner else ''}{node.name}"
        if conversation_id in seen_ids or doc in seen_docs:
            report.skip("repeats an earlier function")
            continue
        seen_ids.add(conversation_id)
        seen_docs.add(doc)
        instruction = STUB_INSTRUCTIONS[len(conversations) % len(STUB_INSTRUCTIONS)]
        content = instruction.format(kind="method" if owner else "function", name=node.name, stub=_stub(node, doc, owner))
        conversations.append(Conversation(conversation_id, [{"role": "user", "content": content}]))
        report.kept += 1


def read_pystubs(root: Path | None = None) -> tuple[list[Conversation], ReadReport]:
    """Standard-library functions and methods as "implement this signature and docstring" chats,
    ids ``pystubs/<file>/<qualified name>``; a docstring seen before is kept once."""
    report = ReadReport(f"pystubs (Python {sys.version_info.major}.{sys.version_info.minor} standard library)")
    conversations, unparsable = [], []
    _stub_chats("pystubs", stdlib_functions(root, unparsable), report, set(), conversations)
    if unparsable:
        logger.info("pystubs: %d standard-library file(s) this Python cannot parse were left out (e.g. %s)", len(unparsable), unparsable[0])
    logger.info(report.summary())
    return conversations, report


#: pure-Python libraries ``pylibs`` reads, all installed with this project's own dependencies (torch
#: brings networkx, mpmath and jinja2; transformers brings numpy and packaging). A package appended at
#: the end keeps every earlier id and prompt; sympy (3,400 more, mostly symbolic-algebra methods) is
#: the obvious next one.
PYLIBS_PACKAGES = ("networkx", "numpy", "mpmath", "packaging", "jinja2")


def read_pylibs(packages: tuple[str, ...] = PYLIBS_PACKAGES) -> tuple[list[Conversation], ReadReport]:
    """Functions and methods of installed pure-Python libraries (:data:`PYLIBS_PACKAGES`) as
    "implement this signature and docstring" chats, ids ``pylibs/<package>/<file>/<qualified name>``,
    the same way :func:`read_pystubs` reads the standard library. Which functions there are depends on
    the installed versions, so the report names them (the data card records them)."""
    from importlib.metadata import version

    roots = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise FileNotFoundError(f"pylibs reads the installed package {package!r}, which is not installed (pip install {package})")
        roots[package] = Path(spec.origin).parent
    report = ReadReport("pylibs (" + ", ".join(f"{package} {version(package)}" for package in packages) + ")")
    conversations, seen_docs = [], set()
    for package, root in roots.items():
        _stub_chats(f"pylibs/{package}", stdlib_functions(root), report, seen_docs, conversations)
    logger.info(report.summary())
    return conversations, report


def _read_json_records(path: Path) -> list:
    """A JSON array, or JSON lines (reasoning-gym ships one of each under the .jsonl.gz name)."""
    text = gzip.open(path, "rt", encoding="utf-8").read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def read_codeio() -> tuple[list[Conversation], ReadReport]:
    """CodeI/O tasks from both of reasoning-gym's files as one-turn chats, ids ``codeio/<file>/<i>``;
    a task whose description repeats an earlier one is kept once."""
    root = reasoning_gym_root() / "data"
    report, seen, conversations = ReadReport("codeio (reasoning-gym)"), set(), []
    for stem in ("codeio-hq", "codeio"):
        for index, record in enumerate(_read_json_records(root / f"{stem}.jsonl.gz")):
            key = record.get("task_description", "").strip() if isinstance(record, dict) else ""
            if key in seen:
                report.skip("repeats an earlier task")
                continue
            content = _code_prompt(record, index) if key else None
            if content is None:
                report.skip("no task description or main_solution")
                continue
            seen.add(key)
            conversations.append(Conversation(f"codeio/{stem}/{index}", [{"role": "user", "content": content}]))
            report.kept += 1
    logger.info(report.summary())
    return conversations, report


__all__ = [
    "GSM_SYMBOLIC_POOL", "PYLIBS_PACKAGES", "read_codeio", "read_gsm_symbolic", "read_pylibs", "read_pystubs",
    "reasoning_gym_root", "stdlib_functions",
]  # fmt: skip
