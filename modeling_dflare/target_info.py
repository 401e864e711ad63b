"""What a target is, read without loading its weights: its shape, its chat template, its name and licence.

Loading a target takes from seconds (a folder of safetensors) to minutes (a GGUF file, dequantised
on load), so the commands check what they can before it loads: whether it has a chat template
(:mod:`modeling_dflare.chat_templates`), whether a draft fits it (``dflare bench``), and what a model
card will say about it (:mod:`modeling_dflare.publish_metadata`). :func:`target_info` answers from
small files only:

* a ``.gguf`` file: its metadata header (:func:`read_gguf_metadata`, about a second even for a
  262k-token vocabulary; the tensors are never read);
* a folder: ``config.json``, the tokenizer's config and template files, the ``README.md`` front
  matter (a Hub snapshot's model card) and the record ``dflare export-target`` writes
  (:data:`EXPORT_RECORD`);
* a Hub id: the same files from the Hub, or from the local cache when offline;
* nothing (``None``): the embedded SmolLM2 GGUF.
"""

import dataclasses
import json
import logging
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: What ``dflare export-target`` records in the folder it writes: where the weights came from.
EXPORT_RECORD = "dflare_export.json"

#: GGUF ``general.file_type`` values (llama.cpp's ``LLAMA_FTYPE_*``) as their usual names.
GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M",
    13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip

# GGUF metadata value types: the fixed-size ones as struct formats; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
#: Arrays longer than this are returned as their length only (the vocabulary, merges, scores).
GGUF_ARRAY_LIMIT = 64


class ArrayLength(int):
    """A GGUF metadata array too long to return (the vocabulary, say): only its length."""


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (version 2 or 3), without its tensors.

    Strings and numbers come back as Python values, arrays of up to :data:`GGUF_ARRAY_LIMIT` items
    as lists, longer ones as their :class:`ArrayLength`. A file that is no GGUF raises ``ValueError``.
    """
    path = Path(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        version = struct.unpack_from("<I", data, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        _, kv_count = struct.unpack_from("<QQ", data, 8)
        offset, metadata = 24, {}

        def string(at: int) -> tuple[str, int]:
            length = struct.unpack_from("<Q", data, at)[0]
            return data[at + 8 : at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

        def value(kind: int, at: int, keep: bool = True) -> tuple[Any, int]:
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                return (struct.unpack_from(fmt, data, at)[0] if keep else None), at + struct.calcsize(fmt)
            if kind == 8:
                if keep:
                    return string(at)
                return None, at + 8 + struct.unpack_from("<Q", data, at)[0]
            if kind == 9:
                item_kind, count = struct.unpack_from("<IQ", data, at)
                at += 12
                keep_items = keep and count <= GGUF_ARRAY_LIMIT
                if item_kind in _GGUF_SCALARS and not keep_items:  # fixed width: skip in one step
                    return ArrayLength(count), at + count * struct.calcsize(_GGUF_SCALARS[item_kind])
                items = []
                for _ in range(count):
                    item, at = value(item_kind, at, keep_items)
                    items.append(item)
                return (items if keep_items else ArrayLength(count)), at
            raise ValueError(f"{path}: unknown GGUF metadata value type {kind} at byte {at}")

        for _ in range(kv_count):
            key, offset = string(offset)
            kind = struct.unpack_from("<I", data, offset)[0]
            metadata[key], offset = value(kind, offset + 4)
    return metadata


@dataclasses.dataclass
class TargetInfo:
    """A target as far as it can be known without loading it; ``None`` where a field is unknown."""

    source: str | None
    kind: str  # "default", "gguf", "folder" or "hub"
    model_type: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    num_hidden_layers: int | None = None
    has_chat_template: bool | None = None
    #: the target's own Hub id (not its parent's), where the files say it
    hub_id: str | None = None
    name: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    #: the GGUF file the weights come from (its name only) and its quantisation, where they do
    gguf_file: str | None = None
    quantization: str | None = None

    @property
    def label(self) -> str:
        """How messages name the target: its Hub id, else its name, else the source as given."""
        if self.kind == "default":
            return self.hub_id or "the embedded SmolLM2 target"
        return str(self.source)

    def shape(self) -> dict[str, int | None]:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "num_hidden_layers": self.num_hidden_layers}


def _text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it under ``text_config``)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) and text.get("hidden_size") else config


def read_front_matter(path: str | os.PathLike) -> dict:
    """The YAML front matter of a markdown file (a model or data card); ``{}`` when it has none."""
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not match:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        logger.warning("%s: front matter does not parse (%s): ignored", path, error)
        return {}
    return data if isinstance(data, dict) else {}


_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/?$")


def hub_id_from_url(url: Any) -> str | None:
    """``ORG/NAME`` of a ``https://huggingface.co/ORG/NAME`` model URL, else None."""
    match = _HUB_URL.match(str(url or "").strip())
    return match.group(1) if match else None


def _from_gguf(path: Path, info: TargetInfo) -> TargetInfo:
    metadata = read_gguf_metadata(path)
    arch = metadata.get("general.architecture")
    info.model_type = arch
    info.hidden_size = metadata.get(f"{arch}.embedding_length")
    info.num_hidden_layers = metadata.get(f"{arch}.block_count")
    tokens = metadata.get("tokenizer.ggml.tokens")
    info.vocab_size = metadata.get(f"{arch}.vocab_size") or (int(tokens) if isinstance(tokens, int) else len(tokens or []) or None)
    info.has_chat_template = bool(metadata.get("tokenizer.chat_template"))
    info.name = metadata.get("general.name")
    # the file's own source, never general.base_model.* (that is the source model's parent)
    info.hub_id = metadata.get("general.source.huggingface.repository") or hub_id_from_url(
        metadata.get("general.source.repo_url") or metadata.get("general.source.url")
    )
    info.license = metadata.get("general.license")
    info.license_name = metadata.get("general.license.name")
    info.license_link = metadata.get("general.license.link")
    info.gguf_file = path.name
    info.quantization = GGUF_FILE_TYPES.get(metadata.get("general.file_type"))
    return info


def _from_card(card: dict, info: TargetInfo) -> None:
    """Licence fields of a model card's front matter (a Hub snapshot's README.md)."""
    license = card.get("license")
    if license and not info.license:
        info.license = str(license)
        info.license_name = card.get("license_name")
        info.license_link = card.get("license_link")


def _template_in_tokenizer_config(tokenizer_config: dict) -> bool:
    return bool(tokenizer_config.get("chat_template"))


def _from_files(read, info: TargetInfo) -> TargetInfo:
    """Fill ``info`` from a folder's or repository's small files; ``read(name)`` gives a local path or None."""
    config_path = read("config.json")
    if config_path is not None:
        config = _text_config(json.loads(Path(config_path).read_text()))
        info.model_type = config.get("model_type")
        info.hidden_size = config.get("hidden_size")
        info.vocab_size = config.get("vocab_size")
        info.num_hidden_layers = config.get("num_hidden_layers")
    template = read("chat_template.jinja") or read("chat_template.json")
    tokenizer_config = read("tokenizer_config.json")
    has_template = template is not None
    if not has_template and tokenizer_config is not None:
        has_template = _template_in_tokenizer_config(json.loads(Path(tokenizer_config).read_text()))
    info.has_chat_template = has_template if (tokenizer_config is not None or template is not None) else None
    card = read("README.md")
    if card is not None:
        _from_card(read_front_matter(card), info)
    record = read(EXPORT_RECORD)
    if record is not None:
        exported = json.loads(Path(record).read_text())
        info.hub_id = info.hub_id or exported.get("hub_id")
        info.name = exported.get("name") or info.name
        info.gguf_file = exported.get("gguf_file")
        info.quantization = exported.get("quantization")
        if not info.license and exported.get("license"):
            info.license, info.license_name, info.license_link = exported["license"], exported.get("license_name"), exported.get("license_link")
    return info


def check_prompt_format(source, prompt_format=None, info: TargetInfo | None = None) -> TargetInfo | None:
    """Refuse, before the target loads, what cannot work: a ``--chat-template`` file that is missing
    or empty, or a target without a chat template and neither ``--chat-template`` nor
    ``--no-chat-template`` (:class:`~modeling_dflare.chat_templates.PromptFormat`). Returns the
    target's :class:`TargetInfo` where it was read (``info``: when the caller has it already)."""
    from .chat_templates import PromptFormat, no_template_message, read_template_file

    prompt_format = prompt_format or PromptFormat()
    if prompt_format.chat_template:
        read_template_file(prompt_format.chat_template)
        return info
    if prompt_format.completion:
        return info
    info = info or target_info(source)
    if info.has_chat_template is False:
        raise ValueError(no_template_message(info.label))
    return info


def target_info(source: str | os.PathLike | None) -> TargetInfo:
    """What :func:`~modeling_dflare.targets.load_target` would load from ``source``, read from small files only.

    A missing path raises the same one-line ``FileNotFoundError`` as loading it would; a Hub id
    whose files cannot be read (offline and not cached) gives a :class:`TargetInfo` of unknowns.
    """
    from .targets import DEFAULT_TARGET_NAME, _split_source, local_or_hub

    folder, kwargs = _split_source(source)  # raises for a missing path
    if source is None or str(source) in ("", "default", "smollm2"):
        info = _from_gguf(Path(folder) / kwargs["gguf_file"], TargetInfo(None, "default"))
        info.hub_id = DEFAULT_TARGET_NAME
        info.license = info.license or "apache-2.0"  # SmolLM2's licence (its model card), which the GGUF omits
        return info
    if "gguf_file" in kwargs:
        return _from_gguf(Path(folder) / kwargs["gguf_file"], TargetInfo(str(source), "gguf"))
    kind, value = local_or_hub(source, "target")
    if kind == "path":
        root = Path(value)
        return _from_files(lambda name: str(root / name) if (root / name).is_file() else None, TargetInfo(str(source), "folder"))
    info = TargetInfo(value, "hub", hub_id=value)
    try:
        from transformers.utils import cached_file

        def read(name: str) -> str | None:
            return cached_file(value, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)

        return _from_files(read, info)
    except Exception as error:  # offline and not cached, gated, unreachable: unknown, checked when it loads
        logger.info("target %r: its files cannot be read before loading (%s)", value, error)
        return info


__all__ = ["ArrayLength", "EXPORT_RECORD", "TargetInfo", "check_prompt_format", "hub_id_from_url", "read_front_matter", "read_gguf_metadata", "target_info"]
