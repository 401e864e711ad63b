"""The frozen target's side of training: hidden states of the draft's target layers, and the
target's greedy next token at every position, computed once and cached on disk.

One cache file per sequence (keyed by a hash of its token ids) holds the layers it was computed
for, in float8 e4m3 with one scale per token and layer (``storage="fp8"``, the default: about
``layers x (hidden + 4)`` bytes per token, 5.2 KB for 9 SmolLM2 layers) or in bf16 (twice that), so:

* epochs after the first read features back instead of running the target again;
* a DFlash draft (5 layers) trains from the cache of a DFlare run (9 layers) when its layers
  are a subset (the default spreads make them one);
* :meth:`TargetFeatures.fill` computes a whole dataset up front in padded batches, with a
  progress bar and a tokens/s figure, which is several times faster than one sequence at a time.

A file cut short by a crash is recomputed, never trusted. Both storages are read back alike, so
:func:`compact_cache` can turn an existing bf16 cache into fp8 (and drop the files no current data
uses) without changing what training reads beyond the rounding.

The cache knows what it holds: ``manifest.json`` in the folder records the target (its weight
fingerprint and hidden size), the tokenizers and max lengths whose sequences filled it, the layers
and the storage. A cache of another target is refused (the keys hash token ids only, so its files
would be read as this target's), and ``dflare cache --keep-data`` prunes with the manifest's
tokenizer and max lengths, never with defaults that would compute other keys. A file whose rows,
width or layers do not fit its sequence is a miss, recomputed, never data. Files are written
through a temporary name of their own process and renamed; an advisory lock (``.lock``) lets
writers share the folder while a prune or a rewrite holds it alone.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # no advisory file locks (Windows): one process per cache folder there
    fcntl = None

STORAGES = ("bf16", "fp8")
FP8_MAX = 448.0  # the largest finite float8 e4m3 value
MANIFEST = "manifest.json"
LOCK = ".lock"
CACHE_FORMAT = "dflare-hidden-state-cache"
#: a cache file's name: the 40 hex digits of :func:`cache_key` and ``.pt``
CACHE_FILE = re.compile(r"[0-9a-f]{40}\.pt")


class CacheMismatchError(ValueError):
    """A hidden-state cache folder that is no cache, or whose manifest disagrees with what uses it."""


@dataclasses.dataclass
class Features:
    """What one frozen target forward gives a training sequence."""

    hidden: torch.Tensor  # [1, L, T * hidden]: chosen layers concatenated, as at inference
    predictions: torch.LongTensor  # [L]: the target's greedy next token after each position


class TargetFeatures:
    """Hidden states of chosen target layers (and the target's greedy predictions) per sequence,
    computed online or cached on disk.

    ``storage`` is how new cache files hold the hidden states: "fp8" (the default: float8 e4m3 with
    a scale per token and layer, half of bf16's bytes; r18's held-out implied and walked acceptance
    read from fp8 files equal those from bf16 files within 0.01,
    docs/analysis/fp8_eval_r18_2026-11-28.json) or "bf16". Files of either kind are read back alike.

    ``precision="bf16"`` runs the target under CPU bf16 autocast (or as is on CUDA); "auto" picks
    bf16 where the hardware has it natively. ``computed`` and ``loaded`` count sequences, so a
    caller can tell whether an epoch ran the target or read the cache.
    """

    def __init__(
        self, target, cache_dir: str | os.PathLike | None = None, precision: str = "fp32", storage: str = "fp8",
        tokenizer=None, max_length: int | None = None,
    ):
        """``tokenizer`` and ``max_length`` (what tokenized the sequences) go into the cache's
        manifest, so that ``dflare cache --keep-data`` recomputes the same keys."""
        from ..regenerate import resolve_precision

        self.storage = check_storage(storage)
        self.target = target
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.precision = resolve_precision(precision, str(getattr(target, "device", "cpu")))
        self.computed = 0
        self.loaded = 0
        self.width = None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.manifest = open_cache(self.cache_dir, target, tokenizer, max_length, self.storage)
            self.width = self.manifest["hidden_size"]

    def _path(self, input_ids: torch.LongTensor) -> Path:
        return self.cache_dir / f"{cache_key(input_ids)}.pt"

    def _autocast(self):
        from ..regenerate import cpu_autocast

        return cpu_autocast(self.precision, str(self.target.device))

    @torch.no_grad()
    def compute(
        self, input_ids: torch.LongTensor, layer_ids: list[int], attention_mask: torch.LongTensor | None = None
    ) -> Features:
        """One target forward ``[B, L]`` -> hidden ``[B, L, T*H]`` and predictions (``[L]`` for B = 1, else ``[B, L]``).

        The output of target layer ``i`` is ``hidden_states[i + 1]`` (index 0 is the embedding).
        Padding must be on the right (causal attention: real tokens never see it).
        """
        device = self.target.device
        with self._autocast():
            out = self.target(
                input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
        hidden = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1).float()
        predictions = out.logits.argmax(-1)
        return Features(hidden, predictions[0] if predictions.shape[0] == 1 else predictions)

    def _save(self, path: Path, layer_ids: list[int], hidden: torch.Tensor, predictions: torch.Tensor) -> None:
        payload = {"layers": list(layer_ids), "predictions": predictions.int().cpu()}
        payload.update(encode_hidden(hidden.cpu(), len(layer_ids), self.storage))
        if not set(layer_ids) <= set(self.manifest["layers"]):
            self.manifest = update_manifest(self.cache_dir, layers=layer_ids)
        with cache_lock(self.cache_dir, exclusive=False):  # writers share the folder; a prune holds it alone
            _write(path, payload)

    def _cached(self, input_ids: torch.LongTensor, layer_ids: list[int]) -> Features | None:
        path = self._path(input_ids)
        cached = _load_cached(path)
        if cached is None:
            return None
        problem = payload_problem(cached, input_ids.numel(), self.width, layer_ids)
        if problem:  # written for other layers, or not for this sequence: recomputed, never read as data
            if problem != MISSING_LAYERS:
                logger.warning("hidden-state cache file %s does not fit its sequence (%s): recomputing it", path, problem)
            return None
        stored, features = list(cached["layers"]), decode_hidden(cached)
        width = features.shape[-1] // len(stored)
        parts = [features[:, stored.index(i) * width : (stored.index(i) + 1) * width] for i in layer_ids]
        device = self.target.device
        return Features(torch.cat(parts, dim=-1)[None].to(device), cached["predictions"].long().to(device))

    def __call__(self, sequence, layer_ids: list[int]) -> Features:
        if self.cache_dir is None:
            self.computed += 1
            return self.compute(sequence.input_ids[None], layer_ids)
        features = self._cached(sequence.input_ids, layer_ids)
        if features is not None:
            self.loaded += 1
            return features
        features = self.compute(sequence.input_ids[None], layer_ids)
        self.computed += 1
        self._save(self._path(sequence.input_ids), layer_ids, features.hidden[0], features.predictions)
        return features

    def fill(self, sequences: list, layer_ids: list[int], batch_tokens: int = 4096, desc: str = "target features") -> dict:
        """Compute and cache every sequence not cached yet, in right-padded batches of similar length.

        Returns ``{"computed", "already_cached", "tokens", "seconds", "tokens_per_second"}``.
        """
        if self.cache_dir is None:
            raise ValueError("TargetFeatures.fill needs a cache_dir (--hidden-cache) to write to")
        todo = [s for s in sequences if not _has_layers(self._path(s.input_ids), layer_ids, s.input_ids.numel(), self.width)]
        todo.sort(key=lambda s: s.input_ids.numel())
        tokens, start = sum(s.input_ids.numel() for s in todo), time.perf_counter()
        with tqdm(total=tokens, desc=desc, unit="tok", unit_scale=True, disable=not todo) as bar:
            index = 0
            while index < len(todo):
                width = todo[index].input_ids.numel()
                count = 1
                # sorted by length: the batch's last sequence is its longest
                while index + count < len(todo) and (count + 1) * todo[index + count].input_ids.numel() <= batch_tokens:
                    count += 1
                batch = todo[index : index + count]
                width = batch[-1].input_ids.numel()
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(batch):
                    ids[row, : sequence.input_ids.numel()] = sequence.input_ids
                    mask[row, : sequence.input_ids.numel()] = 1
                features = self.compute(ids, layer_ids, mask)
                predictions = features.predictions if features.predictions.dim() == 2 else features.predictions[None]
                for row, sequence in enumerate(batch):
                    length = sequence.input_ids.numel()
                    self._save(self._path(sequence.input_ids), layer_ids, features.hidden[row, :length], predictions[row, :length])
                    bar.update(length)
                self.computed += len(batch)
                index += count
        seconds = time.perf_counter() - start
        stats = {
            "computed": len(todo),
            "already_cached": len(sequences) - len(todo),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if todo and seconds > 0 else None,
        }
        logger.info("target features (%s): %s", self.precision, stats)
        return stats


def cache_key(input_ids: torch.LongTensor) -> str:
    """The cache file name (without ``.pt``) of a sequence: a hash of its token ids."""
    return hashlib.sha1(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def encode_hidden(hidden: torch.Tensor, num_layers: int, storage: str) -> dict:
    """The cache payload entries for ``hidden`` ``[L, layers * H]``: ``{"h": bf16}``, or for fp8
    ``{"h_fp8": float8 e4m3, "scale": [L, layers] fp32}`` with each token's layer slice scaled so
    its largest magnitude is 448 (SmolLM2's first token reaches 25,000 in deep layers, its other
    tokens a few hundred: one scale per file would flush them to zero). A reader that predates
    fp8 finds no ``"h"`` and fails loudly rather than reading unscaled values."""
    if storage == "bf16":
        return {"h": hidden.to(torch.bfloat16)}
    length = hidden.shape[0]
    slices = hidden.float().reshape(length, num_layers, -1)
    scale = (slices.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = (slices / scale).to(torch.float8_e4m3fn).reshape(length, -1)
    return {"h_fp8": quantized, "scale": scale[..., 0]}


def check_storage(storage: str, what: str = "hidden-state cache storage") -> str:
    """``storage`` if it is one of :data:`STORAGES`, else a ValueError naming it and the choices."""
    if storage not in STORAGES:
        raise ValueError(f"{what} {storage!r} is not one of {STORAGES}")
    return storage


def storage_of(cached: dict) -> str:
    """The storage (one of :data:`STORAGES`) a cache payload was written in."""
    return "bf16" if "h" in cached else "fp8"


def decode_hidden(cached: dict) -> torch.Tensor:
    """``[L, layers * H]`` float32 hidden states of a cache payload written by :func:`encode_hidden`."""
    if storage_of(cached) == "bf16":
        return cached["h"].float()
    quantized, scale = cached["h_fp8"], cached["scale"].float()
    length, num_layers = scale.shape
    return (quantized.float().reshape(length, num_layers, -1) * scale[..., None]).reshape(length, -1)


def _write(path: Path, payload: dict) -> None:
    """Save ``payload`` through a temporary file of this process's own and an atomic rename: two
    processes writing the same key never share a temporary file, and a reader meets the old file or
    the new one, never half of one."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    """``data`` as JSON into ``path``, through a temporary file of this process's own and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


MISSING_LAYERS = "it lacks some of the layers asked for"


def payload_problem(cached, length: int | None = None, width: int | None = None, layer_ids=()) -> str | None:
    """Why a loaded cache payload cannot be the features of a ``length``-token sequence with
    ``width``-wide layers ``layer_ids`` (None: it can). Only shapes and dtypes are looked at, so a
    memory-mapped payload is checked without reading its data. ``None`` for ``length`` or ``width``
    checks only that the payload agrees with itself."""
    if not isinstance(cached, dict) or not isinstance(cached.get("layers"), (list, tuple)):
        return "it is no cache payload (no layer list)"
    layers = list(cached["layers"])
    if not layers or len(set(layers)) != len(layers) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return f"its layer list {layers!r} is not a list of distinct layer ids"
    predictions = cached.get("predictions")
    if not isinstance(predictions, torch.Tensor) or predictions.dim() != 1 or predictions.is_floating_point():
        return "it has no 1-D integer predictions"
    rows = predictions.shape[0]
    if length is not None and rows != length:
        return f"it holds {rows} positions, the sequence has {length}"
    if "h" in cached:
        hidden, scale = cached["h"], None
    else:
        hidden, scale = cached.get("h_fp8"), cached.get("scale")
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (rows, len(layers)):
            return f"its fp8 scales are not [{rows}, {len(layers)}]"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point() or hidden.shape[0] != rows:
        return f"its hidden states are not [{rows}, layers x width]"
    expected = len(layers) * width if width is not None else None
    if (expected is not None and hidden.shape[1] != expected) or hidden.shape[1] % len(layers):
        return f"its hidden states are {hidden.shape[1]} wide for {len(layers)} layers (expected {len(layers)} x {width})"
    if not set(layer_ids) <= set(layers):
        return MISSING_LAYERS
    return None


def _has_layers(path: Path, layer_ids: list[int], length: int | None = None, width: int | None = None) -> bool:
    """Whether ``path`` is a readable cache file of a ``length``-token sequence with these layers
    (memory-mapped: nothing is read)."""
    cached = _load_cached(path, mmap=True)
    return cached is not None and payload_problem(cached, length, width, layer_ids) is None


# ----------------------------------------------------------------------------------------------
# The manifest and the lock
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cache_lock(folder: Path, exclusive: bool):
    """An advisory lock on ``folder``'s ``.lock`` file across processes: writers of cache files hold
    it shared, a prune or a rewrite and manifest updates hold it alone. Not re-entrant: code that
    holds it calls :func:`_write` and :func:`_write_json` directly."""
    if fcntl is None:
        yield
        return
    with open(Path(folder) / LOCK, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tokenizer_identity(tokenizer) -> dict:
    """Name, size and a hash of the vocabulary and chat template of ``tokenizer``: two tokenizers with
    the same hash turn the same chats into the same token ids, hence the same cache keys."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    template = getattr(tokenizer, "chat_template", None)
    digest = hashlib.sha1(json.dumps([vocab, template], ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    return {"name": getattr(tokenizer, "name_or_path", None) or None, "vocab_size": len(tokenizer), "sha1": digest}


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of cache ``folder`` (None: it has none); a file that is no manifest raises."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CacheMismatchError(f"{path} does not parse ({error}): this folder is not a hidden-state cache, or its manifest is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path} is not a hidden-state cache manifest (format is not {CACHE_FORMAT!r}): this folder is not a cache")
    return manifest


def check_is_cache(folder: str | Path) -> dict | None:
    """Refuse a ``folder`` that is not a hidden-state cache; returns its manifest (None for a cache
    written before manifests existed: a folder of cache files and nothing else)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"hidden-state cache {str(folder)!r} is not a folder")
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest
    names = [p.name for p in folder.iterdir()]
    foreign = sorted(n for n in names if not (CACHE_FILE.fullmatch(n) or n == LOCK or n.endswith(".tmp")))
    if foreign or not any(CACHE_FILE.fullmatch(n) for n in names):
        what = f"files a cache does not hold ({foreign[:5]}{' ...' if len(foreign) > 5 else ''})" if foreign else "no cache file"
        raise CacheMismatchError(
            f"{str(folder)!r} is not a hidden-state cache: no {MANIFEST} and {what} (expected a --hidden-cache folder)"
        )
    return None


def _hidden_size(target) -> int:
    config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    return int(config.hidden_size)


def open_cache(folder: Path, target, tokenizer=None, max_length: int | None = None, storage: str = "fp8") -> dict:
    """Check ``folder``'s manifest against ``target`` (a cache of another target is refused) and
    record this use's tokenizer and max length in it; the first use writes it. Returns the manifest."""
    from ..generation_dflare import fingerprints_match, target_fingerprint

    fingerprint, hidden = target_fingerprint(target), _hidden_size(target)
    name = getattr(getattr(target, "config", None), "name_or_path", None) or None
    identity = tokenizer_identity(tokenizer) if tokenizer is not None else None
    with cache_lock(folder, exclusive=True):
        manifest = read_manifest(folder)
        if manifest is None:
            earlier = sum(1 for p in folder.glob("*.pt") if CACHE_FILE.fullmatch(p.name))
            if earlier:
                logger.warning(
                    "hidden-state cache %s: %d files were written before caches had a manifest; they are taken to be "
                    "this target's (%s)", folder, earlier, name,
                )
            manifest = {
                "format": CACHE_FORMAT, "version": 1, "target": name, "target_fingerprint": fingerprint,
                "hidden_size": hidden, "tokenizers": [], "max_lengths": [], "layers": [], "storage": storage,
                "files_before_manifest": earlier,
            }
            before = None
        else:
            before = json.dumps(manifest, sort_keys=True)
            recorded = manifest.get("target_fingerprint") or []
            if manifest.get("hidden_size") != hidden or not fingerprints_match(recorded, fingerprint):
                raise CacheMismatchError(
                    f"hidden-state cache {str(folder)!r} holds the features of another target ({manifest.get('target')!r}, "
                    f"hidden size {manifest.get('hidden_size')}), not of {name!r} (hidden size {hidden}, other weights): "
                    "give this target a --hidden-cache folder of its own"
                )
        for key in ("tokenizers", "max_lengths", "layers"):
            manifest.setdefault(key, [])
        if identity is not None and identity["sha1"] not in {t.get("sha1") for t in manifest["tokenizers"]}:
            manifest["tokenizers"].append(identity)
        if max_length is not None and int(max_length) not in manifest["max_lengths"]:
            manifest["max_lengths"] = sorted(manifest["max_lengths"] + [int(max_length)])
        manifest["storage"] = storage
        if before != json.dumps(manifest, sort_keys=True):
            _write_json(folder / MANIFEST, manifest)
    return manifest


def update_manifest(folder: Path, layers=(), storage: str | None = None, locked: bool = False) -> dict:
    """Add ``layers`` to the manifest's layer list (and set ``storage``); returns the manifest.
    ``locked``: the caller already holds the folder's lock alone."""
    with contextlib.nullcontext() if locked else cache_lock(folder, exclusive=True):
        manifest = read_manifest(folder)
        if manifest is None:
            return {"layers": list(layers)}
        manifest["layers"] = sorted(set(manifest.get("layers") or []) | set(layers))
        if storage is not None:
            manifest["storage"] = storage
        _write_json(folder / MANIFEST, manifest)
    return manifest


def _load_cached(path: Path, mmap: bool = False) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as error:  # a file cut short by a crash is recomputed, never trusted
        logger.warning("hidden-state cache file %s is unreadable (%s): recomputing it", path, error)
        return None


__all__ = ["CacheMismatchError", "Features", "TargetFeatures", "check_is_cache", "read_manifest", "tokenizer_identity"]
