"""Conversation records, the report every reader fills, and the named conversation sources.

A leaf of the package: the readers (:mod:`modeling_dflare.data` for ShareGPT and chat files,
:mod:`modeling_dflare.prompt_sources` for the domain prompts) build these records, and every
command that takes ``--data NAME`` looks the name up in :data:`SOURCES`.
"""

import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable


@dataclasses.dataclass
class Conversation:
    """One chat: ``messages`` is a list of ``{"role": ..., "content": ...}``."""

    id: str
    messages: list[dict[str, str]]

    @property
    def first_prompt(self) -> list[dict[str, str]]:
        """System turns, then the first user turn (what regeneration answers).

        Assistant turns before the first user turn (a third of ShareGPT opens with one) are dropped,
        so such a conversation is answered from its first user turn instead of being unusable.
        """
        prompt = self.prompt_at(1)
        if prompt is None:
            raise ValueError(f"conversation {self.id!r} has no user turn")
        return prompt

    def prompt_at(self, turn: int) -> list[dict[str, str]] | None:
        """The chat up to and including its ``turn``-th user message (1 = :attr:`first_prompt`),
        earlier replies kept as the data has them; None when it has fewer user turns.

        Later turns answer new questions in contexts the first turns never give (long histories,
        follow-ups), from conversations the data already has.
        """
        if turn < 1:
            raise ValueError(f"turn {turn}: expected 1 or more")
        users = [i for i, message in enumerate(self.messages) if message["role"] == "user"]
        if len(users) < turn:
            return None
        first = users[0]
        return [m for m in self.messages[:first] if m["role"] == "system"] + self.messages[first : users[turn - 1] + 1]


@dataclasses.dataclass
class ReadReport:
    """What a reader kept and what it skipped, by reason."""

    source: str
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    truncated_tail: bool = False

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) or "none"
        return f"{self.source}: kept {self.kept} conversations, dropped {self.dropped} ({reasons})"


#: The named conversation sources (``--data NAME``): name -> (module, reader). A reader takes no
#: argument, returns ``(conversations, report)`` and logs the report's summary. Modules are named,
#: not imported, so this leaf imports no reader and a reader's module loads only when it is read.
SOURCES = {
    "sharegpt": ("modeling_dflare.data", "read_sharegpt"),
    "gsm-symbolic": ("modeling_dflare.prompt_sources", "read_gsm_symbolic"),
    "codeio": ("modeling_dflare.prompt_sources", "read_codeio"),
    "pystubs": ("modeling_dflare.prompt_sources", "read_pystubs"),
    "pylibs": ("modeling_dflare.prompt_sources", "read_pylibs"),
    "ifeval": ("modeling_dflare.instruction_sources", "read_ifeval"),
    "ifbench": ("modeling_dflare.instruction_sources", "read_ifbench"),
    "arena-hard": ("modeling_dflare.instruction_sources", "read_arena_hard"),
    "longwrite": ("modeling_dflare.instruction_sources", "read_longwrite"),
    "writingbench": ("modeling_dflare.instruction_sources", "read_writingbench"),
    "truthfulqa": ("modeling_dflare.instruction_sources", "read_truthfulqa"),
}


def source_reader(name: str) -> Callable[[], tuple[list[Conversation], ReadReport]]:
    """The reader of the named source ``name`` (a key of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"data source {name!r}: expected one of {sorted(SOURCES)}")
    module, function = SOURCES[name]
    return getattr(importlib.import_module(module), function)


__all__ = ["SOURCES", "Conversation", "ReadReport", "source_reader"]
