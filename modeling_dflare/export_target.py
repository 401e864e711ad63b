"""``dflare export-target FILE.gguf OUT_DIR``: a GGUF target saved as a transformers folder.

Every command takes a ``.gguf`` file as ``--target``, but loads it by dequantising every tensor
(a minute or more on a small CPU, each time). Saved once as a folder (fp32 safetensors, the
tokenizer, the chat template where the file has one), the same weights load in seconds, and
``target_fingerprint`` sees the same weights, so a draft trained against either fits both.

transformers refuses to ``save_pretrained`` a model loaded from a GGUF file (its GGUF quantizer says
the model is "not serializable"); the weights are dequantised already, so the quantizer is cleared
first. The folder also gets :data:`~modeling_dflare.target_info.EXPORT_RECORD` (the GGUF file's name,
quantisation, name and licence, for the model card of a draft trained against it) and a short
``README.md`` whose front matter carries the licence. ``OUT_DIR`` must be new or empty.
"""

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuse an ``OUT_DIR`` that exists and holds anything (nothing of it is overwritten)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT_DIR {str(out)!r} exists and is not an empty folder: choose a new folder, or empty this one first")
    return out


def clear_gguf_quantizer(model) -> None:
    """Let ``save_pretrained`` write a model transformers loaded from a GGUF file (already dequantised)."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def export_target(source: str | Path, out_dir: str | Path, *, hub_id: str | None = None, chat_template: str | None = None,
                  model=None, tokenizer=None) -> Path:
    """Save the GGUF target ``source`` as a folder ``out_dir``; returns it.

    ``hub_id``: the Hub id the GGUF was made from (recorded for model cards when its metadata lacks
    it); ``chat_template``: a Jinja file saved as the folder's template. ``model`` / ``tokenizer``:
    the target already loaded from ``source`` (it is saved as it is; the caller's copy stays usable).
    """
    from .chat_templates import read_template_file
    from .targets import load_target, load_tokenizer
    from .target_info import EXPORT_RECORD, target_info

    out = check_out_dir(out_dir)
    if Path(source).suffix != ".gguf":
        raise ValueError(f"{str(source)!r} is not a .gguf file: a folder or Hub id is a target as it is, no export needed")
    if chat_template:
        read_template_file(chat_template)  # a bad file fails before the minute of loading
    if hub_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub_id)
        except HFValidationError as error:
            raise ValueError(f"--hub-id {hub_id!r}: {error}") from None
    info = target_info(source)
    model = model if model is not None else load_target(source, dtype=torch.float32)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    quantizer, config_quantization = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    clear_gguf_quantizer(model)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if chat_template:  # the folder's own template from now on (transformers reads chat_template.jinja first)
            (out / "chat_template.jinja").write_text(read_template_file(chat_template), encoding="utf-8")
    finally:  # the caller's model keeps what it had
        model.hf_quantizer = quantizer
        if config_quantization is not None:
            model.config.quantization_config = config_quantization
    record = {
        "exported_by": "dflare export-target",
        "gguf_file": Path(source).name,
        "quantization": info.quantization,
        "name": info.name,
        "hub_id": hub_id or info.hub_id,
        "license": info.license,
        "license_name": info.license_name,
        "license_link": info.license_link,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "chat_template": Path(chat_template).name if chat_template else ("from the GGUF metadata" if info.has_chat_template else None),
    }
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(_readme(record))
    logger.info("exported %s to %s (%s)", source, out, ", ".join(f"{k} {v}" for k, v in record.items() if v and k != "exported_by"))
    return out


def _readme(record: dict) -> str:
    front = [f"license: {record['license']}"] if record.get("license") else []
    front += [f"license_name: {record['license_name']}"] if record.get("license_name") else []
    front += [f"license_link: {record['license_link']}"] if record.get("license_link") else []
    front += [f"base_model: {record['hub_id']}"] if record.get("hub_id") else []
    header = "---\n" + "\n".join(front) + "\n---\n\n" if front else ""
    name = record.get("name") or record["gguf_file"]
    return (
        header + f"# {name} (exported from {record['gguf_file']})\n\n"
        f"The {record.get('quantization') or 'GGUF'} weights of `{record['gguf_file']}`, dequantised to {record['dtype']} and saved "
        "with `dflare export-target` for a faster load. A local copy for training and benchmarking drafts; "
        "its licence is the original model's.\n"
    )


def add_arguments(parser) -> None:
    parser.add_argument("gguf", help="the target's .gguf file")
    parser.add_argument("out_dir", help="a new or empty folder for the exported target")
    parser.add_argument("--hub-id", default=None, metavar="ORG/NAME",
                        help="the Hub model the GGUF was made from, recorded for model cards (default: the file's own metadata)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template saved as the folder's own (for a GGUF without one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = export_target(args.gguf, args.out_dir, hub_id=args.hub_id, chat_template=args.chat_template)
    print(f"exported {args.gguf} to {out}: pass --target {out} to every dflare command")
    return 0


__all__ = ["check_out_dir", "clear_gguf_quantizer", "export_target"]
