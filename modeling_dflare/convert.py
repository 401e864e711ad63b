"""``dflare convert``: bring published DFlash / DFlare checkpoints into this package's format and back.

Formats (key names and config fields as the public reference model code of each project defines them):

``zlab-dflash`` (z-lab ``dflash/model.py``, the layout vLLM and SGLang load)
    A Qwen3-style ``config.json`` (``model_type: qwen3``, ``architectures: [DFlashDraftModel]``) whose
    DFlash fields live in a ``dflash_config`` dict (``target_layer_ids``, ``mask_token_id``, sometimes
    ``block_size``) or at the top level (``block_size``, ``num_target_layers``). Weights: ``fc.weight``
    ``[H, T*H]``, ``hidden_norm.weight``, ``norm.weight`` and per layer ``layers.N.self_attn.{q,k,v,o}_proj``,
    ``layers.N.self_attn.{q,k}_norm``, ``layers.N.mlp.{gate,up,down}_proj``,
    ``layers.N.{input,post_attention}_layernorm``. Maps to ``fusion="shared"``.

``angelslim-dflare`` (Tencent AngelSlim ``qwen_dflare.py``, ``configs/qwen3_dflare.json``)
    The same Qwen3-style config (``architectures: [QwenDFlareDraftModel]``); weights replace ``fc`` by
    ``layer_fusion_weights`` ``[D, T]`` and add ``layers.N.self_attn.{k,v}_proj_target``. Maps to
    ``fusion="layerwise"``.

Every source tensor is accounted for: it is either mapped to a parameter of the converted draft
(shape-checked) or explicitly ignored because it is recomputed (``rotary_emb.inv_freq``). A key the
converter does not know raises :class:`ConversionError` instead of being dropped, and so does a config
feature this package's draft does not implement (sliding-window or causal draft layers, DFlash 2's
convolutions and candidate selector, embedding or logit scaling), since a silently different model
would generate losslessly but accept far less.

A source folder is foreign input: every size of its config is range-checked before anything is
built from it, and the shard names of a ``*.index.json`` must name files inside the folder (an
absolute or ``..`` name is refused), so a crafted checkpoint gets a one-line error and reads or
allocates nothing else. ``.bin`` weights load with ``torch.load(weights_only=True)``, safe from
torch 2.6 on (the floor ``setup.cfg`` requires).
"""

import argparse
import dataclasses
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

logger = logging.getLogger(__name__)

FORMATS = ("zlab-dflash", "angelslim-dflare")
ZLAB_ARCHITECTURE = "DFlashDraftModel"

# Tensors that some exports carry but that the model recomputes: accounted for, not loaded.
RECOMPUTED_KEY = re.compile(r"^(.*\.)?rotary_emb\.inv_freq$")

_LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_TARGET_KV_KEYS = ("self_attn.k_proj_target.weight", "self_attn.v_proj_target.weight")
_BIAS_KEYS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias")
_TARGET_KV_BIAS_KEYS = ("self_attn.k_proj_target.bias", "self_attn.v_proj_target.bias")


class ConversionError(ValueError):
    """A checkpoint cannot be converted without losing or inventing information."""


@dataclasses.dataclass
class ConversionReport:
    """Where every source tensor went: ``mapped[source_key] = our_key``; ``ignored`` were recomputed buffers."""

    source_format: str
    mapped: dict[str, str] = dataclasses.field(default_factory=dict)
    ignored: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------
# Reading and writing checkpoints
# ----------------------------------------------------------------------------------------------


def read_checkpoint(src: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a folder with ``config.json`` and safetensors or ``pytorch_model.bin`` weights."""
    src = Path(src)
    return read_config(src), read_state_dict(src)


def read_config(src: str | Path) -> dict:
    """The ``config.json`` of checkpoint folder ``src`` as a dict (a missing or unparsable one is a :class:`ConversionError`)."""
    config_path = Path(src) / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: no config.json; expected a checkpoint folder with config.json and weights")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} holds a {type(config).__name__}, expected a JSON object")
    return config


def index_shards(src: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each confined to ``src``: an absolute name, a
    ``..`` part or a non-string name is a :class:`ConversionError` (a crafted index would otherwise
    read any safetensors file on the machine)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index} is not a safetensors index (no weight_map of tensor -> file: {error!r})") from None
    shards = []
    for name in names:
        posix, windows = PurePosixPath(str(name)), PureWindowsPath(str(name))
        if (
            not isinstance(name, str) or not name or posix.is_absolute() or windows.is_absolute() or windows.drive
            or ".." in posix.parts or ".." in windows.parts
        ):
            raise ConversionError(f"{index} names shard {name!r}, outside the checkpoint folder: expected a file name inside {src}")
        shards.append(src / name)
    return shards


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in index_shards(src, index):
            if not shard.is_file():
                raise ConversionError(f"{index} names shard {shard.name!r}, which is not in {src}")
            state.update(load_file(str(shard)))
        return state
    files = sorted(src.glob("*.safetensors"))
    if files:
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for file in bins:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


def _draft_field(config: dict, name: str, default=None):
    """DFlash fields may sit in ``dflash_config`` (preferred, as the reference code reads them) or at the top level."""
    nested = config.get("dflash_config") or {}
    if name in nested:
        return nested[name]
    return config.get(name, default)


# ----------------------------------------------------------------------------------------------
# Source checks
# ----------------------------------------------------------------------------------------------


def detect_format(config: dict, keys) -> str | None:
    """Best guess of a checkpoint's format from its config and tensor names (None when unknown)."""
    keys = set(keys)
    if config.get("model_type") == "dflare":
        return "dflare"
    if "layer_fusion_weights" in keys or any(k.endswith("k_proj_target.weight") for k in keys):
        return "angelslim-dflare"
    if "fc.weight" in keys:
        return "zlab-dflash"
    return None


def _check_source_format(expected: str, config: dict, keys) -> None:
    found = detect_format(config, keys)
    hints = {
        "dflare": "it is already a modeling_dflare draft (config model_type 'dflare'): load it directly",
        "angelslim-dflare": "it looks like an AngelSlim DFlare checkpoint (layer_fusion_weights, k_proj_target): "
        "use --from angelslim-dflare",
        "zlab-dflash": "it looks like a z-lab DFlash checkpoint (fc.weight): use --from zlab-dflash",
        None: "it has neither fc.weight (z-lab DFlash) nor layer_fusion_weights (AngelSlim DFlare)",
    }
    if found != expected:
        raise ConversionError(f"not a {expected} checkpoint: {hints[found]}")
    architectures = config.get("architectures") or []
    if "DFlash2DraftModel" in architectures:
        raise ConversionError(
            "architectures=['DFlash2DraftModel']: DFlash 2 drafts (convolutions, candidate selector) are not "
            "supported; only DFlashDraftModel and QwenDFlareDraftModel convert"
        )


def _check_supported_features(config: dict) -> None:
    """Raise for config features the DFlare draft does not implement (the converted draft would differ)."""
    problems = []
    layer_types = config.get("layer_types") or []
    sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if sliding:
        problems.append(f"layer_types has non-full attention at layers {sliding} ({layer_types[sliding[0]]!r})")
    if config.get("use_sliding_window") or _draft_field(config, "use_swa"):
        problems.append("sliding-window attention (use_sliding_window / dflash_config.use_swa)")
    if config.get("is_causal") or (config.get("dflash_config") or {}).get("causal"):
        problems.append("causal draft attention (is_causal / dflash_config.causal)")
    if _draft_field(config, "attention_sink_bias") or config.get("add_swa_attention_sink_bias"):
        problems.append("attention sink bias")
    for name, neutral in (("input_embedding_scale", 1.0), ("output_multiplier", 1.0)):
        value = _draft_field(config, name)
        if value is not None and float(value) != neutral:
            problems.append(f"{name}={value} (only {neutral} is supported)")
    softcap = _draft_field(config, "final_logit_softcapping")
    if softcap is not None and float(softcap) > 0:
        problems.append(f"final_logit_softcapping={softcap}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial} (rotary embedding on part of each head)")
    if "mrope_section" in rope:
        problems.append("multimodal rotary embedding (rope mrope_section)")
    if config.get("v_head_dim") not in (None, config.get("head_dim")):
        problems.append(f"v_head_dim={config['v_head_dim']} differs from head_dim={config.get('head_dim')}")
    projector = _draft_field(config, "projector_type")
    if projector not in (None, "dflash"):
        problems.append(f"dflash_config.projector_type={projector!r}")
    if problems:
        raise ConversionError("the source draft uses features this package does not implement: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Source -> DFlareConfig
# ----------------------------------------------------------------------------------------------


def _rope_parameters(config: dict) -> dict:
    rope = config.get("rope_parameters")
    if rope:
        return dict(rope)
    params = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if scaling:
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


def _target_layer_ids(config: dict, override: list[int] | None) -> list[int]:
    ids = override if override is not None else _draft_field(config, "target_layer_ids")
    if not ids:
        raise ConversionError(
            "the source config has no target_layer_ids (looked in dflash_config and at the top level): "
            "pass them with --target-layer-ids"
        )
    return [int(i) for i in ids]


#: the source config's size fields and the DFlareConfig field whose range each must be in
_SOURCE_SIZES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_target_layers": "num_target_hidden_layers",
    "block_size": "block_size",
    "max_position_embeddings": "max_position_embeddings",
}
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_source_sizes(config: dict) -> None:
    """Every size of a source config in range (:data:`~modeling_dflare.configuration_dflare.SIZE_RANGES`)
    before anything is computed or allocated from it; the first one that is not raises a
    :class:`ConversionError` naming the field and the value."""
    from .configuration_dflare import SIZE_RANGES, size_problem

    for name, field in _SOURCE_SIZES.items():
        value = _draft_field(config, name) if name == "block_size" else config.get(name)
        if value is None:
            if name in _REQUIRED_SIZES:
                raise ConversionError(f"the source config has no {name}: expected a Qwen3-style config.json")
            continue
        if size_problem(field, value):
            low, high = SIZE_RANGES[field]
            raise ConversionError(f"the source config's {name}={value!r}: expected an integer in [{low}, {high}]")


def build_dflare_config(config: dict, fusion: str, *, target_layer_ids: list[int] | None = None, target: str | None = None):
    """A :class:`DFlareConfig` with the geometry and DFlash fields of a Qwen3-style source config.

    Sizes are range-checked first (:func:`check_source_sizes`); whatever else the config gets wrong
    is the :class:`DFlareConfig` validators' one-line message, as a :class:`ConversionError`."""
    check_source_sizes(config)
    try:
        return _build_dflare_config(config, fusion, target_layer_ids, target)
    except ConversionError:
        raise
    except (TypeError, ValueError) as error:  # DFlareConfigError (a ValueError) says field, value and expected
        raise ConversionError(f"the source config does not make a valid DFlare config: {str(error).strip().splitlines()[0]}") from error


def _build_dflare_config(config: dict, fusion: str, target_layer_ids: list[int] | None, target: str | None):
    from .configuration_dflare import DFlareConfig

    ids = _target_layer_ids(config, target_layer_ids)
    mask_token_id = _draft_field(config, "mask_token_id")
    if mask_token_id is None:
        raise ConversionError("the source config has no mask_token_id (looked in dflash_config and at the top level)")
    depth = config.get("num_target_layers")
    if depth is None:
        depth = max(ids) + 1
        logger.warning("source config has no num_target_layers: assuming the target has %d layers", depth)
    heads = int(config["num_attention_heads"])
    num_layers = int(config["num_hidden_layers"])
    return DFlareConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(heads if config.get("num_key_value_heads") is None else config["num_key_value_heads"]),
        head_dim=int(int(config["hidden_size"]) // heads if config.get("head_dim") is None else config["head_dim"]),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_parameters=_rope_parameters(config),
        attention_bias=bool(config.get("attention_bias", False)),
        layer_types=["full_attention"] * num_layers,
        target_layer_ids=ids,
        num_target_hidden_layers=int(depth),
        block_size=int(_draft_field(config, "block_size", 16)),
        mask_token_id=int(mask_token_id),
        fusion=fusion,
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        target_name_or_path=target,
    )


# ----------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------


def expected_keys(config) -> set[str]:
    """Every tensor name a :class:`DFlareModel` with ``config`` stores (weights and persistent buffers)."""
    keys = {"hidden_norm.weight", "norm.weight"}
    keys.add("fc.weight" if config.fusion == "shared" else "layer_fusion_weights")
    if config.draft_vocab_size is not None:
        keys.add("draft_vocab_ids")
    per_layer = list(_LAYER_KEYS)
    if config.fusion == "layerwise":
        per_layer += _TARGET_KV_KEYS
    if config.attention_bias:
        per_layer += _BIAS_KEYS + (_TARGET_KV_BIAS_KEYS if config.fusion == "layerwise" else ())
    for layer in range(config.num_hidden_layers):
        keys.update(f"layers.{layer}.{name}" for name in per_layer)
    return keys


def map_state_dict(state: dict[str, torch.Tensor], config, source_format: str) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename (identity for both formats) and check every source tensor; raise on unknown or missing ones."""
    report = ConversionReport(source_format=source_format)
    wanted = expected_keys(config)
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if RECOMPUTED_KEY.match(key):
            report.ignored.append(key)
        elif key in wanted:
            mapped[key] = tensor
            report.mapped[key] = key
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} source tensor(s) have no place in a {config.fusion}-fusion DFlare draft and would be "
            f"dropped: {sorted(unknown)[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    missing = sorted(wanted - set(mapped))
    if missing:
        raise ConversionError(
            f"the source checkpoint lacks {len(missing)} tensor(s) the draft needs: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    _check_shapes(mapped, config)
    return mapped, report


def _check_shapes(state: dict[str, torch.Tensor], config) -> None:
    from .modeling_dflare import DFlareModel

    with torch.device("meta"):
        reference = DFlareModel(config).state_dict()
    wrong = [
        f"{key}: {tuple(tensor.shape)} (expected {tuple(reference[key].shape)})"
        for key, tensor in state.items()
        if tuple(tensor.shape) != tuple(reference[key].shape)
    ]
    if wrong:
        raise ConversionError("tensor shapes do not match the config: " + "; ".join(wrong[:8]))


def save_draft(config, state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write ``state`` as a DFlare draft folder (config with auto_map, both Hub files, model.safetensors)."""
    from .modeling_dflare import DFlareModel

    out = Path(out)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = DFlareModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.config.dtype = dtype
    model.save_pretrained(out)
    _readable(out)
    return out


def _readable(folder: Path) -> None:
    """Make every written file 0644 (``save_pretrained`` leaves model.safetensors 0600)."""
    for file in Path(folder).iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o644)


def convert(
    src: str | Path,
    out: str | Path,
    source_format: str,
    *,
    target_layer_ids: list[int] | None = None,
    target: str | None = None,
) -> ConversionReport:
    """Convert a ``zlab-dflash`` or ``angelslim-dflare`` checkpoint folder into a DFlare draft folder ``out``."""
    if source_format not in FORMATS:
        raise ConversionError(f"--from {source_format!r}: expected one of {FORMATS}")
    config_dict = read_config(src)
    check_source_sizes(config_dict)  # before any weight is read or anything is built from a size
    state = read_state_dict(Path(src))
    _check_source_format(source_format, config_dict, state.keys())
    _check_supported_features(config_dict)
    fusion = "shared" if source_format == "zlab-dflash" else "layerwise"
    config = build_dflare_config(config_dict, fusion, target_layer_ids=target_layer_ids, target=target)
    mapped, report = map_state_dict(state, config, source_format)
    save_draft(config, mapped, out)
    (Path(out) / "conversion_report.json").write_text(report.to_json())
    logger.info(
        "converted %s (%s) -> %s: %d tensors mapped, %d recomputed buffers ignored",
        src, source_format, out, len(report.mapped), len(report.ignored),
    )
    return report


# ----------------------------------------------------------------------------------------------
# Export: DFlare (shared fusion) -> z-lab DFlash
# ----------------------------------------------------------------------------------------------

LAYERWISE_EXPORT_ERROR = (
    "this draft uses layer-wise fusion (fusion='layerwise': per-layer layer_fusion_weights and "
    "k_proj_target / v_proj_target), which the z-lab DFlash format cannot express: vLLM and SGLang load "
    "only DFlash's single shared fc fusion, so they cannot serve a layer-wise DFlare draft yet. Serve it "
    "with transformers (target.generate(..., assistant_model=draft)), or train a fusion='shared' (DFlash) "
    "draft for those engines."
)


def zlab_config(config, dtype: torch.dtype) -> dict:
    """The Qwen3-style config.json of the z-lab DFlash layout for a shared-fusion DFlareConfig."""
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    return {
        "architectures": [ZLAB_ARCHITECTURE],
        "model_type": "qwen3",
        "attention_bias": config.attention_bias,
        "attention_dropout": float(config.attention_dropout),
        "block_size": config.block_size,
        "dflash_config": {"mask_token_id": config.mask_token_id, "target_layer_ids": list(config.target_layer_ids)},
        "dtype": str(dtype).removeprefix("torch."),
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_target_layers": config.num_target_hidden_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def export_zlab_dflash(draft_dir: str | Path, out: str | Path, *, drop_draft_vocab: bool = False) -> ConversionReport:
    """Write a shared-fusion DFlare draft in the z-lab DFlash layout (config.json + model.safetensors).

    Raises :class:`ConversionError` for a layer-wise draft (see :data:`LAYERWISE_EXPORT_ERROR`) and for a
    draft with a reduced draft vocabulary unless ``drop_draft_vocab`` (the engines draft over the full
    vocabulary: the exported draft then proposes from all tokens, which changes its proposals).
    """
    from safetensors.torch import save_file

    from .configuration_dflare import DFlareConfig

    draft_dir, out = Path(draft_dir), Path(out)
    config = DFlareConfig.from_pretrained(draft_dir)
    if config.fusion != "shared":
        raise ConversionError(LAYERWISE_EXPORT_ERROR)
    state = read_state_dict(draft_dir)
    report = ConversionReport(source_format="dflare")
    if config.draft_vocab_size is not None:
        if not drop_draft_vocab:
            raise ConversionError(
                f"this draft proposes from a reduced vocabulary (draft_vocab_size={config.draft_vocab_size}); the "
                "z-lab DFlash format has no such field, so the engines would draft over all tokens. Pass "
                "--drop-draft-vocab to export it anyway (proposals may change, output stays lossless)"
            )
        state.pop("draft_vocab_ids", None)
        report.ignored.append("draft_vocab_ids")
        config.draft_vocab_size = None
    if config.confidence_threshold:
        report.notes.append(f"confidence_threshold={config.confidence_threshold} is not part of the z-lab format")
    mapped, mapping = map_state_dict(state, config, "dflare")
    report.mapped = mapping.mapped
    report.ignored += mapping.ignored
    dtypes = {t.dtype for t in mapped.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mapped.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _readable(out)
    (out / "config.json").write_text(json.dumps(zlab_config(config, dtype), indent=2) + "\n")
    logger.info("exported %s -> %s (z-lab DFlash layout, %d tensors)", draft_dir, out, len(mapped))
    return report


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=FORMATS, help="format of SRC, converted into ours")
    direction.add_argument("--to", dest="target_format", choices=("zlab-dflash",), help="export our SRC draft to this format")
    parser.add_argument("src", type=Path, help="source checkpoint folder (config.json + weights)")
    parser.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated target layer ids, when the source config lacks them")
    parser.add_argument("--target", default=None, help="target model id to record in the converted config")
    parser.add_argument("--drop-draft-vocab", action="store_true",
                        help="--to zlab-dflash: export a reduced-vocabulary draft over the full vocabulary")


def run(args: argparse.Namespace) -> int:
    if not Path(args.src).exists():
        raise SystemExit(f"dflare convert: source {str(args.src)!r}: no such folder (convert reads a local checkpoint folder)")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"dflare convert: output folder {args.out} is not empty; choose a new folder")
    try:
        if args.source_format:
            report = convert(args.src, args.out, args.source_format, target_layer_ids=args.target_layer_ids, target=args.target)
        else:
            report = export_zlab_dflash(args.src, args.out, drop_draft_vocab=args.drop_draft_vocab)
    except ConversionError as error:
        raise SystemExit(f"dflare convert: {error}") from None
    print(f"wrote {args.out}: {len(report.mapped)} tensors mapped, {len(report.ignored)} ignored {report.ignored}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
