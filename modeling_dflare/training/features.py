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
"""

import dataclasses
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STORAGES = ("bf16", "fp8")
FP8_MAX = 448.0  # the largest finite float8 e4m3 value


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
    read from fp8 files equal those from bf16 files within 0.01, docs/analysis/s20_fp8_eval.json)
    or "bf16". Files of either kind are read back alike.

    ``precision="bf16"`` runs the target under CPU bf16 autocast (or as is on CUDA); "auto" picks
    bf16 where the hardware has it natively. ``computed`` and ``loaded`` count sequences, so a
    caller can tell whether an epoch ran the target or read the cache.
    """

    def __init__(
        self, target, cache_dir: str | os.PathLike | None = None, precision: str = "fp32", storage: str = "fp8"
    ):
        from ..regenerate import resolve_precision

        self.storage = check_storage(storage)
        self.target = target
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.precision = resolve_precision(precision, str(getattr(target, "device", "cpu")))
        self.computed = 0
        self.loaded = 0
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

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
        _write(path, payload)

    def _cached(self, input_ids: torch.LongTensor, layer_ids: list[int]) -> Features | None:
        cached = _load_cached(self._path(input_ids))
        if cached is None or not set(layer_ids) <= set(cached["layers"]):
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
        todo = [s for s in sequences if not _has_layers(self._path(s.input_ids), layer_ids)]
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
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _has_layers(path: Path, layer_ids: list[int]) -> bool:
    """Whether ``path`` is a readable cache file with these layers (memory-mapped: nothing is read)."""
    cached = _load_cached(path, mmap=True)
    return cached is not None and set(layer_ids) <= set(cached["layers"])


def _load_cached(path: Path, mmap: bool = False) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as error:  # a file cut short by a crash is recomputed, never trusted
        logger.warning("hidden-state cache file %s is unreadable (%s): recomputing it", path, error)
        return None


__all__ = ["Features", "TargetFeatures"]
