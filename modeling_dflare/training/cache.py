"""``dflare cache``: size the hidden-state cache to the machine.

The cache grows with every installment (one file per training sequence, 10 KB per token in bf16
for 9 SmolLM2 layers). This command

* rewrites bf16 files as fp8 (``--storage fp8``: float8 e4m3, one scale per token and layer, about
  half the bytes; see :func:`~modeling_dflare.training.features.encode_hidden`);
* with ``--keep-data a,b,...``, deletes the files of sequences that none of those answer folders
  tokenizes to (answers re-cut, data no longer used) and says how many and how large (they are
  features, rebuilt from the answers when a run needs them again; ``--dry-run`` first to see);
* with ``--dry-run``, only reports what it would do.

Files are rewritten one at a time through a temporary file and an atomic rename: an interrupted run
leaves every file readable, and running it again finishes the job. Do not run it while a training
run of an older version (one that predates fp8) reads the same cache.
"""

import logging
from pathlib import Path

from tqdm.auto import tqdm

from .features import STORAGES, _load_cached, _write, cache_key, check_storage, decode_hidden, encode_hidden, storage_of

logger = logging.getLogger(__name__)


def sequence_keys(sources: list[str], tokenizer, max_length: int) -> set[str]:
    """The cache file names (without ``.pt``) of every sequence the answer ``sources`` tokenize to
    at ``max_length``: the keys :class:`~modeling_dflare.training.features.TargetFeatures` uses."""
    from .data import read_source, tokenize_conversations

    keys = set()
    for source in sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"--keep-data {source!r} does not exist (expected an answer folder or a chat file)")
        sequences, _ = tokenize_conversations(tokenizer, read_source(source), max_length)
        keys.update(cache_key(s.input_ids) for s in sequences)
    return keys


def compact_cache(cache_dir: str | Path, storage: str = "fp8", keep: set[str] | None = None, dry_run: bool = False) -> dict:
    """Rewrite every file of ``cache_dir`` in ``storage`` and, when ``keep`` is given, delete the
    files whose key is not in it. Returns counts and sizes in bytes before and after."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        raise NotADirectoryError(f"hidden-state cache {str(cache_dir)!r} is not a folder")
    check_storage(storage, "--storage")
    if keep is not None and not keep:
        raise ValueError("--keep-data tokenizes to no sequence: that would delete the whole cache (expected answer folders with answers)")
    files = sorted(folder.glob("*.pt"))
    stats = {"files": len(files), "bytes_before": 0, "bytes_after": 0, "deleted": 0, "deleted_bytes": 0,
             "rewritten": 0, "unreadable": 0, "dry_run": dry_run}
    for path in tqdm(files, desc=f"cache -> {storage}", unit="file"):
        size = path.stat().st_size
        stats["bytes_before"] += size
        if keep is not None and path.stem not in keep:
            stats["deleted"] += 1
            stats["deleted_bytes"] += size
            if not dry_run:
                path.unlink()
            continue
        cached = _load_cached(path)
        if cached is None:  # cut short by a crash: training recomputes it, nothing to keep
            stats["unreadable"] += 1
            continue
        current = storage_of(cached)
        if current == storage or dry_run:
            stats["bytes_after"] += size if current == storage else size // 2
            stats["rewritten"] += current != storage
            continue
        layers = list(cached["layers"])
        payload = {"layers": layers, "predictions": cached["predictions"]}
        payload.update(encode_hidden(decode_hidden(cached), len(layers), storage))
        _write(path, payload)
        stats["rewritten"] += 1
        stats["bytes_after"] += path.stat().st_size
    logger.info("hidden-state cache %s: %s", folder, stats)
    return stats


def add_arguments(parser) -> None:
    parser.add_argument("hidden_cache", help="the hidden-state cache folder (as given to dflare train --hidden-cache)")
    parser.add_argument("--storage", choices=STORAGES, default="fp8", help="rewrite every file in this storage (default fp8)")
    parser.add_argument(
        "--keep-data",
        default=None,
        help="comma-separated answer folders (training and held-out) whose sequences to keep; every other file is deleted",
    )
    parser.add_argument("--max-length", type=int, default=768, help="the --max-length the kept data trains at (it sets the keys)")
    parser.add_argument("--target", default=None, help="target folder or GGUF (default: the embedded SmolLM2) for its tokenizer")
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted and rewritten; change nothing")


def run(args) -> int:
    """``dflare cache``: compact (and with ``--keep-data`` prune) a hidden-state cache."""
    keep = None
    if args.keep_data:
        from ..targets import load_tokenizer

        keep = sequence_keys([s for s in args.keep_data.split(",") if s], load_tokenizer(args.target), args.max_length)
    stats = compact_cache(args.hidden_cache, args.storage, keep, args.dry_run)
    mib = 1024 * 1024
    verb = "would be" if args.dry_run else "were"
    print(
        f"{stats['files']} files, {stats['bytes_before'] / mib:,.0f} MiB -> {stats['bytes_after'] / mib:,.0f} MiB"
        f"{' (estimated)' if args.dry_run else ''}: {stats['rewritten']} {verb} rewritten as {args.storage}, "
        f"{stats['deleted']} ({stats['deleted_bytes'] / mib:,.0f} MiB) {verb} deleted, {stats['unreadable']} unreadable"
    )
    return 0


__all__ = ["compact_cache", "sequence_keys"]
