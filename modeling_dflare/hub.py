"""Publishing drafts and the demo Space: model cards, ``dflare push`` and ``dflare push-space``.

Both commands validate the whole folder first and stage exactly the files to upload into one folder:
``--dry-run OUT`` writes that folder to ``OUT``; a real push uploads it in a single commit. Nothing is
created on the Hub before every check has passed and the token has been confirmed, so a push that
fails (offline, no token, a bad folder) leaves nothing half-uploaded.

Benchmark JSON read by the model card (``dflare bench`` writes ``bench.json``; other layouts work too):

* rows: the top-level list, or the first list among the keys ``results``, ``rows``, ``runs``;
* per row: ``method`` (or ``name``), ``dataset`` (or ``task``), acceptance length from ``tau`` /
  ``acceptance_length`` / ``mean_acceptance_length``, throughput from ``tokens_per_second`` /
  ``tokens_per_s`` / ``throughput``, ``speedup`` (or ``speedup_vs_plain``), and ``mismatches``
  (0 means the output was identical to plain decoding);
* context: ``meta.hardware`` (``processor`` / ``gpu``), ``meta.device``, ``meta.dtype``, ``meta.settings``
  (``max_new_tokens``, ``num_prompts``, ``repeats``);
* how many prompts and timed repeats stand behind each number: the row's ``prompts`` and
  ``meta.settings.repeats`` (a column when the repeats are recorded); a speedup above the row's own
  free-draft ``ceiling`` is flagged in its cell, not shown as a plain result.

Rows without a method are skipped and counted in a warning; a JSON with rows but none usable raises.
"""

import argparse
import ast
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CARD_TEMPLATE = PACKAGE_DIR.parent / "hub_cards" / "draft_model_card.md"
REQUIRED_TAGS = ("dflare", "dflash", "speculative-decoding", "draft-model", "block-diffusion")
#: The code that travels with a draft: the config, the model and the two files the model imports.
HUB_FILES = ("configuration_dflare.py", "modeling_dflare.py", "generation_dflare.py", "cpu_kernels_dflare.py", "verify_dflare.py")
EXPECTED_AUTO_MAP = {"AutoConfig": "configuration_dflare.DFlareConfig", "AutoModel": "modeling_dflare.DFlareModel"}
# Written into a card whose Hub id is not known yet; `dflare push` replaces it with --repo-id.
REPO_ID_PLACEHOLDER = "{hub_repo_id}"
OPTIONAL_DRAFT_FILES = ("generation_config.json", "bench.json", "conversion_report.json", "training_summary.json", "LICENSE", ".gitattributes")
SPACE_IGNORED_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", ".pytest_cache", ".gradio", "flagged"}
SPACE_IGNORED_SUFFIXES = (".pyc", ".pyo", ".log")
TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
# The Hub identifies these import names with packages of another name.
IMPORT_TO_PACKAGE = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "cv2": "opencv-python"}


class PushError(ValueError):
    """A folder cannot be published as it is, or the Hub cannot be reached; nothing was uploaded."""


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def _first(row: dict, *names):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _number(value, digits: int, suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    return f"{value:.{digits}f}{suffix}"


def load_bench_rows(path: str | Path) -> tuple[list[dict], str]:
    """``(rows, context sentence)`` for the card's benchmark table from a ``dflare bench`` JSON (see module doc)."""
    data = json.loads(Path(path).read_text())
    raw = data if isinstance(data, list) else next((data[k] for k in ("results", "rows", "runs") if isinstance(data.get(k), list)), [])
    settings = ((data.get("meta") or {}).get("settings") or {}) if isinstance(data, dict) else {}
    repeats = settings.get("repeats")
    rows, skipped = [], 0
    for row in raw:
        method = _first(row, "method", "name") if isinstance(row, dict) else None
        if method is None:
            skipped += 1
            continue
        # sampled rows are not compared with plain decoding token by token: no lossless cell for them
        mismatches = None if row.get("temperature") else row.get("mismatches")
        speedup = _first(row, "speedup", "speedup_vs_plain")
        ceiling = row.get("ceiling")
        above = isinstance(speedup, (int, float)) and isinstance(ceiling, (int, float)) and speedup > ceiling
        prompts = row.get("prompts") or settings.get("num_prompts")
        rows.append({
            "method": method,
            # a sampled row (``dflare bench --temperatures``) names its temperature beside the dataset
            "dataset": (_first(row, "dataset", "task") or "–") + (f" (T={row['temperature']:g})" if row.get("temperature") else ""),
            "acceptance_length": _number(_first(row, "tau", "acceptance_length", "mean_acceptance_length"), 2),
            "tokens_per_s": _number(_first(row, "tokens_per_second", "tokens_per_s", "throughput"), 1),
            "speedup": _number(speedup, 2, "x") + (f" (flagged: above this run's {ceiling:.2f}x free-draft ceiling)" if above else ""),
            "lossless": "–" if mismatches is None else ("yes" if mismatches == 0 else f"no ({mismatches} differ)"),
            "has_lossless": mismatches is not None,
            "behind": f"{prompts or '?'} × {repeats}" if repeats else "–",
            "above_ceiling": above,
        })
    if skipped:
        logger.warning("%s: %d benchmark row(s) without a method skipped", path, skipped)
    if raw and not rows:
        raise ValueError(f"{path}: none of its {len(raw)} benchmark rows has a 'method' (or 'name') field")
    return rows, _bench_context(data.get("meta") if isinstance(data, dict) else None)


def _bench_context(meta: dict | None) -> str:
    if not isinstance(meta, dict):
        return ""
    hardware = meta.get("hardware") or {}
    machine = hardware.get("gpu") or hardware.get("processor") if isinstance(hardware, dict) else str(hardware)
    settings = meta.get("settings") or {}
    parts = [f"Measured on {machine}{_machine_details(hardware)}" if machine else "Measured"]
    if isinstance(meta.get("date"), str) and meta["date"][:10]:
        parts[0] += f" on {meta['date'][:10]}"
    if meta.get("device"):
        parts.append(f"device `{meta['device']}`")
    if meta.get("dtype"):
        parts.append(f"{meta['dtype']}")
    if settings.get("num_prompts"):
        parts.append(f"{settings['num_prompts']} prompts per dataset")
    if settings.get("repeats"):
        parts.append(f"each timing the median of {settings['repeats']} repeat{'s' if settings['repeats'] != 1 else ''} "
                     "after an untimed warm-up")
    else:
        parts.append("repeats per timing not recorded")
    if settings.get("max_new_tokens"):
        parts.append(f"{settings['max_new_tokens']} new tokens")
    sampled = [t for t in settings.get("temperatures") or [] if t]
    if settings.get("greedy"):
        parts.append("greedy decoding")
    elif sampled:
        parts.append(("greedy decoding and " if 0 in settings["temperatures"] else "") + "sampling at temperature " + ", ".join(f"{t:g}" for t in sampled))
    return ", ".join(parts) + "."


def _machine_details(hardware) -> str:
    """`` (2 cores, 2 torch threads; avx2 avx512f)`` from a bench's hardware record: what decides CPU timings."""
    if not isinstance(hardware, dict) or hardware.get("gpu"):
        return ""
    details = []
    if hardware.get("cpu_count"):
        details.append(f"{hardware['cpu_count']} cores")
    if hardware.get("torch_threads"):
        details.append(f"{hardware['torch_threads']} torch thread{'s' if hardware['torch_threads'] != 1 else ''}")
    text = ", ".join(details)
    if hardware.get("cpu_features"):
        text += ("; " if text else "") + " ".join(str(f) for f in hardware["cpu_features"])
    return f" ({text})" if text else ""


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def weight_summary(draft_dir: Path) -> tuple[int, str]:
    """``(number of parameters, dtype name)`` from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    total, dtypes = 0, set()
    for file in sorted(draft_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                total += count
                dtypes.add(piece.get_dtype())
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I64": "int64"}
    return total, "/".join(sorted(names.get(d, d) for d in dtypes if d != "I64")) or "unknown"


def card_context(draft_dir: Path, *, base_model: str, datasets: list[str], training: dict, bench_json, repo_id,
                 prompt_sources: list[str] | None = None) -> dict:
    """Template variables of the draft card (``prompt_sources``: the "Training prompts" line, default ``datasets``).

    Local paths in the training facts and command are cut to their last part: they mean nothing on the Hub."""
    from .generation_dflare import SUPPORTED_TRANSFORMERS
    from .publish_metadata import strip_local_paths

    config = json.loads((draft_dir / "config.json").read_text())
    layerwise = config.get("fusion", "layerwise") == "layerwise"
    parameters, dtype = weight_summary(draft_dir)
    training = dict(training or {})
    command = training.pop("command", None)
    rows, context = load_bench_rows(bench_json) if bench_json else ([], "")
    training_rows = [(str(k).replace("_", " "), strip_local_paths(_format_value(v))) for k, v in training.items()]
    vocab = config.get("draft_vocab_size")
    return dict(
        model_name=repo_id or REPO_ID_PLACEHOLDER,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        base_model=base_model,
        method_name="DFlare" if layerwise else "DFlash",
        fusion=config.get("fusion", "layerwise"),
        fusion_description="layer-wise fusion: each draft layer mixes the target layers with its own softmax weights"
        if layerwise
        else "shared fusion: one projection of the concatenated target layers feeds every draft layer",
        num_layers=config["num_hidden_layers"],
        target_layer_ids=config["target_layer_ids"],
        num_target_hidden_layers=config.get("num_target_hidden_layers"),
        target_model_type=config.get("target_model_type"),
        block_size=config["block_size"],
        mask_token_id=config["mask_token_id"],
        draft_vocabulary=f"{vocab} most frequent tokens (verification uses the full vocabulary)" if vocab else f"full ({config['vocab_size']} tokens)",
        num_parameters=f"{parameters / 1e6:.1f} M parameters" if parameters >= 1e5 else f"{parameters} parameters",
        weights_dtype=dtype,
        training_command=strip_local_paths(command) if command else command,
        training_rows=training_rows,
        has_trained_against=any(key == "trained against" for key, _ in training_rows),
        transformers_range=SUPPORTED_TRANSFORMERS,
        datasets=list(datasets or []),
        prompt_sources=[strip_local_paths(str(p)) for p in (prompt_sources if prompt_sources is not None else datasets or [])],
        bench_rows=rows,
        bench_context=context,
        bench_has_lossless=any(r["has_lossless"] for r in rows),
        bench_has_behind=any(r["behind"] != "–" for r in rows),
        bench_has_flagged=any(r["above_ceiling"] for r in rows),
    )


def render_model_card(draft_dir, *, base_model: str, datasets: list[str], training: dict, bench_json=None,
                      license: str | None = None, repo_id: str | None = None, template_path=None,
                      prompt_sources: list[str] | None = None, license_name: str | None = None, license_link: str | None = None):
    """The draft's :class:`huggingface_hub.ModelCard` (metadata + text) without writing it.

    ``license``: the base model's licence (a licence the Hub does not list is written as ``other``
    with ``license_name`` and ``license_link``); None leaves it out, and ``dflare push`` asks for it."""
    from .publish_metadata import license_metadata
    from huggingface_hub import ModelCard, ModelCardData

    draft_dir = Path(draft_dir)
    template = Path(template_path or CARD_TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found: it lives in the repository's hub_cards/ "
                                "(install modeling_dflare editable from a checkout, or pass template_path)")
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        pipeline_tag="text-generation",
        tags=list(REQUIRED_TAGS),
        datasets=list(datasets) or None,
        **license_metadata(license, license_name, license_link),
    )
    context = card_context(draft_dir, base_model=base_model, datasets=datasets, training=training, bench_json=bench_json,
                           repo_id=repo_id, prompt_sources=prompt_sources)
    return ModelCard.from_template(data, template_path=str(template), **context)


def write_model_card(draft_dir, *, base_model: str, datasets: list[str], training: dict, bench_json: str | None = None,
                     license: str | None = None, repo_id: str | None = None, prompt_sources: list[str] | None = None,
                     license_name: str | None = None, license_link: str | None = None) -> Path:
    """Write ``README.md`` (the model card) into ``draft_dir`` and return its path.

    ``training`` holds free-form recipe facts (command, data size, steps, hardware, wall time, final
    per-position accuracy, ...): ``command`` is shown as a code block, the rest as a table in insertion
    order. ``bench_json`` is a ``dflare bench`` JSON for the benchmark table. Without ``repo_id`` the
    usage snippet names :data:`REPO_ID_PLACEHOLDER`, which ``dflare push --repo-id`` fills in.
    ``prompt_sources`` is the text of the "Training prompts" line (default: ``datasets``), which may name
    sources that are no Hub dataset. ``license``: the base model's (None: left out, for ``dflare push`` to ask).
    """
    card = render_model_card(draft_dir, base_model=base_model, datasets=datasets, training=training,
                             bench_json=bench_json, license=license, repo_id=repo_id, prompt_sources=prompt_sources,
                             license_name=license_name, license_link=license_link)
    from .data import write_text_atomic

    # through a temporary file and a rename: a rewrite (dflare tune-cut) never leaves a torn card
    return write_text_atomic(Path(draft_dir) / "README.md", str(card))


def check_model_card(path: Path) -> list[str]:
    """Problems of a draft card's metadata (empty when it is publishable)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        card = ModelCard.load(path)
    except Exception as error:  # a YAML or front-matter error: report it as a folder problem
        return [f"{path.name}: card metadata does not parse: {error}"]
    data = card.data.to_dict()
    problems = []
    for field, expected in (("library_name", "transformers"), ("pipeline_tag", "text-generation")):
        if data.get(field) != expected:
            problems.append(f"{path.name}: {field}={data.get(field)!r}, expected {expected!r}")
    missing_tags = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing_tags:
        problems.append(f"{path.name}: tags lack {missing_tags}")
    if not data.get("license"):
        problems.append(f"{path.name}: no license in the metadata")
    elif data["license"] == "other" and not data.get("license_name"):
        problems.append(f"{path.name}: license 'other' without a license_name (the Hub asks for one)")
    base = data.get("base_model")
    try:
        validate_repo_id(base if isinstance(base, str) else "")
    except HFValidationError:
        problems.append(f"{path.name}: base_model={base!r} is not a Hub model id (expected ORG/NAME of the target)")
    from .publish_metadata import BASE_MODEL_PLACEHOLDER, local_paths

    if BASE_MODEL_PLACEHOLDER in card.text:
        problems.append(f"{path.name}: the text still names {BASE_MODEL_PLACEHOLDER} (pass --base-model)")
    paths = local_paths(card.text)
    if paths:
        problems.append(f"{path.name}: names local paths, which mean nothing on the Hub: {', '.join(sorted(set(paths))[:4])}")
    return problems


# ----------------------------------------------------------------------------------------------
# Draft folder validation
# ----------------------------------------------------------------------------------------------


def _allowed_import(name: str) -> bool:
    root = name.split(".")[0]
    # packaging is a dependency of transformers itself, so every environment that loads the draft has it
    return root in ("torch", "transformers", "huggingface_hub", "packaging") or root in sys.stdlib_module_names


def check_hub_file(path: Path) -> list[str]:
    """A Hub code file must parse and import only torch, transformers, huggingface_hub, stdlib or siblings."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as error:
        return [f"{path.name}: does not parse ({error})"]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if not _allowed_import(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not _allowed_import(node.module or ""):
            bad.append(node.module)
    return [f"{path.name}: imports {sorted(set(bad))}, which a clean environment with only torch and transformers lacks"] if bad else []


def _defines_class(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(
        (isinstance(n, ast.ClassDef) and n.name == name) or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets))
        for n in tree.body
    )


def check_config(draft_dir: Path) -> list[str]:
    path = draft_dir / "config.json"
    if not path.is_file():
        return ["config.json is missing"]
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return [f"config.json does not parse: {error}"]
    problems = []
    if config.get("model_type") != "dflare":
        problems.append(f"config.json: model_type={config.get('model_type')!r}, expected 'dflare' (convert other formats with `dflare convert`)")
    auto_map = config.get("auto_map") or {}
    for auto_class, expected in EXPECTED_AUTO_MAP.items():
        reference = auto_map.get(auto_class)
        if reference is None:
            problems.append(f"config.json: auto_map lacks {auto_class} (expected {expected!r}; save the draft with save_pretrained after `import modeling_dflare`)")
            continue
        module, _, class_name = reference.rpartition(".")
        code = draft_dir / f"{module}.py"
        if code.is_file() and not _defines_class(code, class_name):
            problems.append(f"config.json: auto_map {auto_class}={reference!r} but {code.name} defines no {class_name}")
    return problems


def weight_files(draft_dir: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files of a draft (sharded or not) and problems finding them."""
    index = draft_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (draft_dir / s).is_file()]
        files = [index] + [draft_dir / s for s in shards if s not in missing]
        return files, [f"model.safetensors.index.json names missing shards {missing}"] if missing else []
    if (draft_dir / "model.safetensors").is_file():
        return [draft_dir / "model.safetensors"], []
    other = [p.name for p in draft_dir.glob("*.bin")]
    hint = f" (found {other}: re-save with save_pretrained, which writes safetensors)" if other else ""
    return [], [f"model.safetensors is missing{hint}"]


def check_weights(draft_dir: Path, files: list[Path]) -> list[str]:
    """Tensor names and shapes in the safetensors files must be exactly those of the config's model."""
    import torch
    from safetensors import safe_open

    from .configuration_dflare import DFlareConfig
    from .modeling_dflare import DFlareModel

    try:
        config = DFlareConfig.from_pretrained(draft_dir)
    except Exception as error:  # the config's own validation message is the useful part
        return [f"config.json does not load as a DFlareConfig: {error}"]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DFlareModel(config).state_dict().items()}
    found = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                found.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    problems = []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"weights lack {len(missing)} tensor(s) of the config's model: {missing[:6]}")
    if unexpected:
        problems.append(f"weights hold {len(unexpected)} tensor(s) the model does not have: {unexpected[:6]}")
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in set(found) & set(expected) if found[k] != expected[k]]
    if wrong:
        problems.append(f"tensor shapes differ from the config: {sorted(wrong)[:6]}")
    return problems


def check_secrets(files: list[Path], root: Path) -> list[str]:
    """No file may contain the current Hugging Face token or anything shaped like one."""
    token = _current_token()
    problems = []
    for file in files:
        data = file.read_bytes()
        if token and token.encode() in data:
            problems.append(f"{file.relative_to(root)} contains your Hugging Face token")
        elif file.suffix not in (".safetensors",) and TOKEN_PATTERN.search(data):
            problems.append(f"{file.relative_to(root)} contains a string shaped like a Hugging Face token (hf_...)")
    return problems


def collect_draft_files(draft_dir: str | Path) -> list[Path]:
    """Validate a draft folder and return the files to upload; raise :class:`PushError` listing every problem."""
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise PushError(f"{draft_dir} is not a folder")
    problems = check_config(draft_dir)
    files = [draft_dir / "config.json"]
    for name in HUB_FILES:
        path = draft_dir / name
        if path.is_file():
            problems += check_hub_file(path)
            files.append(path)
            if path.read_bytes() != (PACKAGE_DIR / name).read_bytes():
                logger.warning("%s differs from the installed modeling_dflare's copy: the folder was saved with another "
                               "version of the code (--update-code publishes the installed one)", path)
        else:
            problems.append(f"{name} is missing (save_pretrained copies it when modeling_dflare is imported)")
    weights, weight_problems = weight_files(draft_dir)
    problems += weight_problems
    files += weights
    if not problems:
        problems += check_weights(draft_dir, weights)
    card = draft_dir / "README.md"
    if card.is_file():
        problems += check_model_card(card)
        files.append(card)
    else:
        problems.append("README.md (the model card) is missing: write it with modeling_dflare.hub.write_model_card or pass --base-model and --license")
    files += [draft_dir / name for name in OPTIONAL_DRAFT_FILES if (draft_dir / name).is_file()]
    files += sorted(p for p in draft_dir.glob("*.png") if p.is_file())
    problems += check_secrets(files, draft_dir)
    if problems:
        raise PushError(f"{draft_dir} cannot be published:\n  - " + "\n  - ".join(problems))
    skipped = sorted(p.relative_to(draft_dir).as_posix() for p in draft_dir.rglob("*") if p.is_file() and p not in files)
    if skipped:
        logger.info("not uploaded (not part of a published draft): %s", ", ".join(skipped))
    return files


# ----------------------------------------------------------------------------------------------
# Space folder validation
# ----------------------------------------------------------------------------------------------


def _requirement_names(path: Path) -> tuple[set[str], list[str]]:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    names, problems = set(), []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        if "://" in line and "@" not in line:
            continue  # a bare URL: pip resolves its name at install time
        try:
            names.add(canonicalize_name(Requirement(line).name))
        except InvalidRequirement as error:
            problems.append(f"requirements.txt line {number}: {raw.strip()!r} is not a requirement ({error})")
    return names, problems


def _guards_import_error(node) -> bool:
    if not isinstance(node, ast.Try):
        return False
    names = set()
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names.update(getattr(t, "id", None) for t in types)
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def _unresolved_imports(app: Path, space_dir: Path, requirements: set[str]) -> list[str]:
    from packaging.utils import canonicalize_name

    tree = ast.parse(app.read_text())
    optional = {id(n) for guard in ast.walk(tree) if _guards_import_error(guard) for stmt in guard.body for n in ast.walk(stmt)}
    roots = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue  # `try: import x / except ImportError:` is an optional dependency
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    provided = {"gradio", "spaces"}  # installed by the gradio SDK / ZeroGPU runtime
    unresolved = []
    for root in sorted(roots):
        local = (space_dir / f"{root}.py").is_file() or (space_dir / root / "__init__.py").is_file()
        package = canonicalize_name(IMPORT_TO_PACKAGE.get(root, root))
        if not (root in sys.stdlib_module_names or root in provided or local or package in requirements):
            unresolved.append(root)
    return unresolved


def check_space_readme(space_dir: Path) -> list[str]:
    from huggingface_hub import SpaceCard

    path = space_dir / "README.md"
    if not path.is_file():
        return ["README.md is missing (a Space needs YAML front matter with sdk: gradio)"]
    try:
        data = SpaceCard.load(path).data.to_dict()
    except Exception as error:  # a YAML or front-matter error: report it as a folder problem
        return [f"README.md front matter does not parse: {error}"]
    problems = []
    if data.get("sdk") != "gradio":
        problems.append(f"README.md: sdk={data.get('sdk')!r}, expected 'gradio'")
    app_file = data.get("app_file", "app.py")
    if not (space_dir / app_file).is_file():
        problems.append(f"README.md: app_file={app_file!r} does not exist in {space_dir}")
    if not data.get("title"):
        problems.append("README.md: no title in the front matter")
    if not data.get("sdk_version"):
        logger.warning("%s/README.md has no sdk_version: the Hub picks a gradio version itself", space_dir)
    return problems


def collect_space_files(space_dir: str | Path) -> list[Path]:
    """Validate a Space folder (app.py, README.md front matter, requirements.txt) and return its files."""
    space_dir = Path(space_dir)
    if not space_dir.is_dir():
        raise PushError(f"{space_dir} is not a folder")
    problems = check_space_readme(space_dir)
    app = space_dir / "app.py"
    if not app.is_file():
        problems.append("app.py is missing")
    else:
        try:
            ast.parse(app.read_text(), filename=str(app))
        except SyntaxError as error:
            problems.append(f"app.py does not parse: {error}")
    requirements = space_dir / "requirements.txt"
    names: set[str] = set()
    if requirements.is_file():
        names, requirement_problems = _requirement_names(requirements)
        problems += requirement_problems
    else:
        problems.append("requirements.txt is missing (list what app.py imports besides gradio)")
    if not problems:
        unresolved = _unresolved_imports(app, space_dir, names)
        if unresolved:
            problems.append(f"app.py imports {unresolved}, which neither requirements.txt nor the Space folder provides")
    files = sorted(
        p for p in space_dir.rglob("*")
        if p.is_file()
        and not any(part in SPACE_IGNORED_DIRS or (part.startswith(".") and part != ".gitattributes") for part in p.relative_to(space_dir).parts)
        and not p.name.endswith(SPACE_IGNORED_SUFFIXES)
    )
    problems += check_secrets(files, space_dir)
    if problems:
        raise PushError(f"{space_dir} cannot be published as a Space:\n  - " + "\n  - ".join(problems))
    return files


# ----------------------------------------------------------------------------------------------
# Staging and uploading
# ----------------------------------------------------------------------------------------------


def stage(files: list[Path], root: Path, out: Path, repo_id: str) -> list[Path]:
    """Copy ``files`` (relative to ``root``) into ``out``, naming ``repo_id`` in the card; return the copies.

    The copies, never the originals, lose local paths: a ``config.json`` whose ``target_name_or_path``
    is one names the card's ``base_model`` (else the path's last component), and every string of
    ``training_summary.json`` is cut to the last component of any path in it."""
    from .publish_metadata import card_base_model, clean_staged_config, strip_local_paths_json

    staged = []
    for file in files:
        destination = out / file.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if file.name == "README.md":
            destination.write_text(file.read_text().replace(REPO_ID_PLACEHOLDER, repo_id))
        else:
            shutil.copy2(file, destination)
        staged.append(destination)
    if out / "config.json" in staged:
        clean_staged_config(out / "config.json", card_base_model(out / "README.md"))
    if out / "training_summary.json" in staged:
        strip_local_paths_json(out / "training_summary.json")
    return staged


def _current_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.is_offline_mode() if value == "" else value.upper() in ("1", "ON", "YES", "TRUE")


def check_repo_id(repo_id: str) -> None:
    """A ``PushError`` naming the value unless ``repo_id`` is a valid ``ORG/NAME`` Hub id (dry runs too)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"--repo-id {repo_id!r}: {error}") from None
    if "/" not in repo_id:
        raise PushError(f"--repo-id {repo_id!r}: expected ORG/NAME")


def hub_session(repo_id: str):
    """An authenticated :class:`HfApi` after checking the network and the token, before anything is created."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if _offline():
        raise PushError(
            "HF_HUB_OFFLINE is set (dflare sets it by default): run with HF_HUB_OFFLINE=0 to upload. "
            "Nothing was uploaded; --dry-run OUT shows what would be."
        )
    token = _current_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`. Nothing was uploaded.")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as error:  # network or auth failure: both mean stop before creating anything
        raise PushError(f"the Hub rejected the token or cannot be reached ({type(error).__name__}: {error}). Nothing was uploaded.") from None
    logger.info("authenticated as %s", user.get("name"))
    return api


def validate_card_on_hub(path: Path) -> None:
    """The Hub's own metadata check of the card, before the repository is created."""
    from huggingface_hub import ModelCard

    try:
        ModelCard.load(path).validate(repo_type="model")
    except Exception as error:  # the Hub's message names the bad field
        raise PushError(f"the Hub rejected the model card metadata: {error}. Nothing was uploaded.") from None


def upload(api, staged_dir: Path, repo_id: str, *, repo_type: str, private: bool, revision: str | None, message: str, **create_kwargs) -> str:
    """Create the repo if needed and upload ``staged_dir`` in one commit; delete a repo we created if that fails."""
    existed = api.repo_exists(repo_id, repo_type=repo_type)
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **create_kwargs)
    try:
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=staged_dir, repo_type=repo_type, revision=revision, commit_message=message)
    except Exception:
        if not existed:
            logger.error("upload failed: deleting the repository %s created for it", repo_id)
            api.delete_repo(repo_id, repo_type=repo_type, missing_ok=True)
        raise
    return str(url)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise PushError(f"--dry-run {out}: folder is not empty; choose a new folder so it holds exactly the upload")
    out.mkdir(parents=True, exist_ok=True)


def publish(files: list[Path], root: Path, args, *, repo_type: str, message: str, **create_kwargs) -> int:
    """Dry run into ``args.dry_run`` or upload ``files``; shared by both commands."""
    check_repo_id(args.repo_id)
    if args.dry_run:
        out = Path(args.dry_run)
        _prepare_out(out)
        staged = stage(files, root, out, args.repo_id)
        total = sum(p.stat().st_size for p in staged)
        print(f"dry run: {len(staged)} files ({total / 2**20:.2f} MiB) would be uploaded to {repo_type} {args.repo_id}"
              f"{' (private)' if args.private else ''}{f' @ {args.revision}' if args.revision else ''}; written to {out}")
        for path in staged:
            print(f"  {path.relative_to(out).as_posix()}  {path.stat().st_size} bytes")
        return 0
    api = hub_session(args.repo_id)
    with tempfile.TemporaryDirectory(prefix="dflare-push-") as tmp:
        staged = stage(files, root, Path(tmp), args.repo_id)
        if repo_type == "model":
            validate_card_on_hub(next(p for p in staged if p.name == "README.md"))
        url = upload(api, Path(tmp), args.repo_id, repo_type=repo_type, private=args.private, revision=args.revision,
                     message=args.commit_message or message, **create_kwargs)
    print(f"uploaded {len(files)} files to {url}")
    return 0


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing; default main)")
    parser.add_argument("--dry-run", metavar="OUT", default=None, help="write exactly what would be uploaded into OUT; upload nothing")
    parser.add_argument("--commit-message", default=None)


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("draft_dir", type=Path, help="draft folder: config.json, the Hub .py files, model.safetensors, README.md")
    _common_arguments(parser)
    card = parser.add_argument_group(
        "model card: what the card written by dflare train still lacks (dflare push names it), filled into DRAFT_DIR/README.md")
    card.add_argument("--base-model", default=None, metavar="ORG/NAME", help="the Hub id of the target the draft was trained for")
    card.add_argument("--dataset", action="append", default=[], metavar="ORG/NAME",
                      help="a Hub dataset of the training prompts (repeatable; replaces the card's; 'none': no Hub dataset)")
    card.add_argument("--bench-json", default=None, help="dflare bench JSON for the card's benchmark table")
    card.add_argument("--license", default=None, metavar="ID", help="the base model's licence (e.g. apache-2.0, gemma, llama3.2)")
    parser.add_argument("--update-code", action="store_true",
                        help="copy the installed package's Hub code files (" + ", ".join(HUB_FILES) + ") into DRAFT_DIR first")


def _benchmark_section(draft_dir: Path, bench_json: str) -> str:
    """The card's "## Benchmarks" section rendered from ``bench_json`` alone (the template's own text)."""
    text = render_model_card(draft_dir, base_model=BASE_MODEL_FOR_SECTIONS, datasets=[], training={}, bench_json=bench_json).text
    return _section(text, "## Benchmarks")


#: Any valid id: only the benchmark section of a card rendered with it is kept.
BASE_MODEL_FOR_SECTIONS = "org/model"


def _section(text: str, heading: str) -> str:
    """The section of a card from ``heading`` to the next ``## `` heading (or the end)."""
    start = text.find(heading + "\n")
    if start < 0:
        raise PushError(f"the card has no {heading!r} section for --bench-json to replace (it was not written by dflare)")
    following = text.find("\n## ", start + len(heading))
    return text[start : following + 1 if following >= 0 else len(text)]


def fill_model_card(draft_dir: Path, *, base_model: str | None = None, license: str | None = None, datasets: list[str] | None = None,
                    bench_json: str | None = None) -> list[str]:
    """Fill what is given into the card ``draft_dir/README.md`` (the rest of it as it was written) and
    return the flags it still needs (:func:`~modeling_dflare.publish_metadata.missing_fields`).

    ``base_model`` replaces the card's metadata and its placeholder (or its previous id) in the text;
    ``license`` is the base model's; ``datasets`` replace the card's (``["none"]``: no Hub dataset);
    ``bench_json`` replaces the benchmark section. ``training_summary.json``'s record says which
    training data no data card described, for which ``--dataset`` is asked."""
    from huggingface_hub import ModelCard

    from .data import write_text_atomic
    from .publish_metadata import BASE_MODEL_PLACEHOLDER, is_hub_id, license_metadata, missing_fields

    path = draft_dir / "README.md"
    card = ModelCard.load(path)
    text = card.text
    if base_model:
        previous = card.data.base_model
        if isinstance(previous, str) and is_hub_id(previous) and previous != base_model:
            text = text.replace(previous, base_model)
        text = text.replace(BASE_MODEL_PLACEHOLDER, base_model)
        card.data.base_model = base_model
    if license:
        for key in ("license", "license_name", "license_link"):
            setattr(card.data, key, None)
        for key, value in license_metadata(license).items():
            setattr(card.data, key, value)
    if datasets:
        card.data.datasets = [d for d in datasets if d != "none"] or None
    if bench_json:
        text = text.replace(_section(text, "## Benchmarks"), _benchmark_section(draft_dir, bench_json))
    card.text = text
    if base_model or license or datasets or bench_json:
        write_text_atomic(path, card.content)
    summary_path = draft_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    record = summary.get("publish") or {}
    if record and (base_model or license or datasets):  # kept for the card's next rewrite (dflare tune-cut)
        if base_model:
            record.update(base_model=base_model, base_model_from="dflare push --base-model")
        if license:
            record.update(license=license, license_name=None, license_link=None, license_from="dflare push --license")
        if datasets:
            record.update(datasets=[d for d in datasets if d != "none"], datasets_from="--dataset", undescribed_data=[])
        write_text_atomic(summary_path, json.dumps(summary, indent=2))
    return missing_fields(base_model=card.data.base_model, license=card.data.license,
                          undescribed_data=record.get("undescribed_data") or [], datasets_given=bool(datasets))


def run_push(args: argparse.Namespace) -> int:
    from .publish_metadata import is_hub_id, missing_message

    try:
        check_repo_id(args.repo_id)
        if args.base_model and not is_hub_id(args.base_model):
            raise PushError(f"--base-model {args.base_model!r}: expected the Hub id ORG/NAME of the target (not a local path)")
        if args.update_code:
            for name in HUB_FILES:
                if (args.draft_dir / name).resolve() != (PACKAGE_DIR / name).resolve():  # a link to the package is current
                    shutil.copy2(PACKAGE_DIR / name, args.draft_dir / name)
            logger.info("copied the installed %s into %s", " and ".join(HUB_FILES), args.draft_dir)
        card, summary_path = args.draft_dir / "README.md", args.draft_dir / "training_summary.json"
        if card.is_file():
            missing = fill_model_card(args.draft_dir, base_model=args.base_model, license=args.license, datasets=args.dataset,
                                      bench_json=args.bench_json)
            if missing:
                record = (json.loads(summary_path.read_text()).get("publish") or {}) if summary_path.is_file() else {}
                raise PushError(missing_message(missing, record.get("undescribed_data") or []))
        elif args.base_model and args.draft_dir.is_dir():  # a folder without a card (a converted draft): write one
            training = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
            if "cumulative" in training:
                raise PushError("README.md is missing, and dflare train wrote this draft: `dflare tune-cut DRAFT --heldout ...` "
                                "rewrites its card from training_summary.json")
            if not args.license:
                raise PushError(missing_message(["--license"]))
            write_model_card(args.draft_dir, base_model=args.base_model, datasets=[d for d in args.dataset if d != "none"],
                             training=training, bench_json=args.bench_json, license=args.license)
        files = collect_draft_files(args.draft_dir)
        return publish(files, args.draft_dir, args, repo_type="model", message="Upload DFlare draft with dflare push")
    except PushError as error:
        raise SystemExit(f"dflare push: {error}") from None


def add_push_space_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space_dir", type=Path, help="Space folder: app.py, README.md (sdk: gradio), requirements.txt")
    _common_arguments(parser)


def run_push_space(args: argparse.Namespace) -> int:
    try:
        check_repo_id(args.repo_id)
        files = collect_space_files(args.space_dir)
        return publish(files, args.space_dir, args, repo_type="space", message="Upload DFlare demo Space with dflare push-space", space_sdk="gradio")
    except PushError as error:
        raise SystemExit(f"dflare push-space: {error}") from None
