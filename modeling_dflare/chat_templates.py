"""How chats become prompts: the target's own chat template, a Jinja file, or plain completion text.

Every command that turns chats into token ids (``regenerate``, ``train``, ``evaluate``,
``tune-cut``, ``bench``, ``demo``, ``cache``) takes the same two flags
(:func:`add_prompt_format_arguments`):

* ``--chat-template FILE``: a Jinja chat template, as transformers takes it
  (``tokenizer.chat_template``), for a target that has none or to replace its own;
* ``--no-chat-template``: plain completion prompts for a base model: each turn's text followed by a
  blank line, no role markers (:func:`completion_template`).

Without either, the target's own template is used (a GGUF file's comes from its metadata), and a
target without one is refused in one line before it loads
(:func:`modeling_dflare.target_info.check_prompt_format`), naming both ways on. Whichever format trains a draft should also run it: the training summary, the data
cards of regenerated answers and the model card record it.
"""

import dataclasses
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: What follows each turn in a completion prompt (and separates a prompt from its answer).
COMPLETION_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """``chat_template``: a Jinja file replacing the target's template; ``completion``: no template at all."""

    chat_template: str | None = None
    completion: bool = False

    def __post_init__(self):
        if self.chat_template and self.completion:
            raise ValueError("--chat-template and --no-chat-template exclude each other: pass one of them")

    @classmethod
    def from_args(cls, args) -> "PromptFormat":
        """The format a command's parsed flags (or a :class:`~modeling_dflare.training.TrainArgs`) ask for."""
        return cls(getattr(args, "chat_template", None) or None, bool(getattr(args, "no_chat_template", False)))

    @property
    def name(self) -> str:
        """``"chat"`` (the target's template), ``"chat-template-file"`` or ``"completion"``."""
        return "completion" if self.completion else "chat-template-file" if self.chat_template else "chat"

    def describe(self) -> str:
        """One phrase for logs, summaries and model cards (a file by its name only, never its path)."""
        if self.completion:
            return "plain completion prompts (each turn's text, then a blank line; no chat template)"
        if self.chat_template:
            return f"the chat template of {Path(self.chat_template).name}"
        return "the target's own chat template"

    def flags(self) -> list[str]:
        """The command-line flags that ask for this format (what a command printed for reuse shows)."""
        if self.completion:
            return ["--no-chat-template"]
        return ["--chat-template", str(self.chat_template)] if self.chat_template else []

    def record(self) -> dict:
        """What training summaries and data cards keep: the format and, for a file, its name and text."""
        record = {"prompt_format": self.name, "description": self.describe()}
        if self.chat_template:
            record["chat_template_file"] = Path(self.chat_template).name
            record["chat_template"] = read_template_file(self.chat_template)
        return record


def add_prompt_format_arguments(parser) -> None:
    """``--chat-template FILE`` and ``--no-chat-template``, mutually exclusive."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--chat-template", default=None, metavar="FILE",
        help="Jinja chat template (as transformers takes it) for a target without one, or replacing its own",
    )
    group.add_argument(
        "--no-chat-template", action="store_true",
        help="plain completion prompts for a base model: each turn's text, then a blank line, no role markers",
    )


def draft_prompt_format(draft_dir: str | Path | None) -> PromptFormat | None:
    """The prompt format a draft was trained with, from its ``training_summary.json`` (None: it records
    none, or only the target's own template, or its ``--chat-template`` file is not here any more)."""
    path = Path(draft_dir) / "training_summary.json" if draft_dir else None
    if path is None or not path.is_file():
        return None
    try:
        args = json.loads(path.read_text()).get("args") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if args.get("no_chat_template"):
        return PromptFormat(completion=True)
    if args.get("chat_template") and Path(args["chat_template"]).is_file():
        return PromptFormat(chat_template=args["chat_template"])
    return None


def resolve_prompt_format(args, draft_dir: str | Path | None = None) -> PromptFormat:
    """The flags' format; without either flag, the one ``draft_dir`` was trained with (where it
    records one), so a draft is measured on prompts shaped like its training data."""
    explicit = PromptFormat.from_args(args)
    if explicit.chat_template or explicit.completion:
        return explicit
    trained = draft_prompt_format(draft_dir)
    if trained is not None:
        logger.info("prompts: %s, as the draft %s was trained (its training_summary.json)", trained.describe(), Path(draft_dir).name)
        return trained
    return explicit


def read_template_file(path: str | Path) -> str:
    """The text of a ``--chat-template`` file; a missing or empty file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {str(path)!r}: no such file (expected a Jinja chat template)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--chat-template {str(path)!r} is empty (expected a Jinja chat template)")
    return text


def no_template_message(label: str) -> str:
    """The one-line refusal of a target without a chat template, naming both ways on."""
    return (
        f"target {label!r} has no chat template (a base model?): pass --chat-template FILE (a Jinja chat template, "
        "as transformers takes it) or --no-chat-template (plain completion prompts: each turn's text, then a blank line)"
    )


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with the BOS token (what a completion prompt must start with too)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def completion_template(tokenizer) -> str:
    """A Jinja template that writes chats as plain text: the BOS token where the tokenizer adds one,
    then each turn's text followed by a blank line, except after a final assistant turn.

    So a prompt (its turns, then the blank line) is a prefix of the same chat with its answer, as
    training needs; ``add_generation_prompt`` adds nothing (the blank line is already there)."""
    bos = "{{ bos_token }}" if adds_bos(tokenizer) else ""
    separator = COMPLETION_SEPARATOR.encode("unicode_escape").decode()
    return (
        bos + "{% for message in messages %}{{ message['content'] }}"
        "{% if not (loop.last and message['role'] == 'assistant') %}{{ '" + separator + "' }}{% endif %}{% endfor %}"
    )


def apply_prompt_format(tokenizer, prompt_format: PromptFormat | None = None):
    """Give ``tokenizer`` the chat template ``prompt_format`` asks for (the target's own: unchanged); returns it."""
    prompt_format = prompt_format or PromptFormat()
    if prompt_format.chat_template:
        tokenizer.chat_template = read_template_file(prompt_format.chat_template)
    elif prompt_format.completion:
        tokenizer.chat_template = completion_template(tokenizer)
    return tokenizer


def require_chat_template(tokenizer, label: str) -> None:
    """The one-line refusal for a tokenizer that arrives without a template (a target checked too late)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(no_template_message(label))


__all__ = [
    "COMPLETION_SEPARATOR", "PromptFormat", "add_prompt_format_arguments", "apply_prompt_format", "draft_prompt_format", "resolve_prompt_format",
    "completion_template", "no_template_message", "read_template_file", "require_chat_template",
]  # fmt: skip
