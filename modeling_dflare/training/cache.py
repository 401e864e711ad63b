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

It works only on a cache (a folder with the cache's ``manifest.json``, or one written before
manifests existed that holds cache files and nothing else), holds the cache's lock alone while it
runs (training runs filling the same cache wait for it), and prunes with the tokenizer and the max
lengths the manifest records: a ``--max-length`` or a ``--target`` tokenizer other than the ones
that filled the cache would compute other keys and delete files that are still used, so they are
refused.
"""

import logging
from pathlib import Path

from tqdm.auto import tqdm

from .features import (
    CACHE_FILE,
    STORAGES,
    CacheMismatchError,
    _load_cached,
    _write,
    cache_key,
    cache_lock,
    check_is_cache,
    check_storage,
    decode_hidden,
    encode_hidden,
    payload_problem,
    storage_of,
    tokenizer_identity,
    update_manifest,
)

logger = logging.getLogger(__name__)


def sequence_keys(sources: list[str], tokenizer, max_length: int) -> set[str]:
    """The cache file names (without ``.pt``) of every sequence the answer ``sources`` tokenize to
    at ``max_length``: the keys :class:`~modeling_dflare.training.features.TargetFeatures` uses."""
    from .sequences import read_source, tokenize_conversations

    keys = set()
    for source in sources:
        if not Path(source).exists():
            raise FileNotFoundError(f"--keep-data {source!r} does not exist (expected an answer folder or a chat file)")
        sequences, _ = tokenize_conversations(tokenizer, read_source(source), max_length)
        keys.update(cache_key(s.input_ids) for s in sequences)
    return keys


def keep_keys(cache_dir: str | Path, sources: list[str], tokenizer, max_length: int | None = None) -> set[str]:
    """The keys of the sequences ``sources`` tokenize to, at every max length the cache's manifest
    records (what :func:`compact_cache` keeps). Refuses what would compute other keys than the
    ones that filled the cache: a tokenizer the manifest does not record (or a cache filled by
    several), a ``max_length`` other than the recorded ones, and a cache whose max lengths are
    unknown (files from before manifests) without an explicit ``max_length``."""
    manifest = check_is_cache(cache_dir)
    where = f"hidden-state cache {str(cache_dir)!r}"
    if manifest is None:
        if max_length is None:
            raise CacheMismatchError(
                f"{where} has no manifest, so the --max-length that made its keys is unknown: pass --max-length "
                "(the value of the training runs that filled it)"
            )
        return _keys_at(sources, tokenizer, [max_length])
    tokenizers = manifest.get("tokenizers") or []
    identity = tokenizer_identity(tokenizer)
    if len(tokenizers) > 1:
        raise CacheMismatchError(
            f"{where} was filled through {len(tokenizers)} tokenizers ({[t.get('name') for t in tokenizers]}): pruning with one "
            "would delete the sequences of the others; rewrite it without --keep-data"
        )
    if tokenizers and tokenizers[0].get("sha1") != identity["sha1"]:
        raise CacheMismatchError(
            f"{where} was filled through tokenizer {tokenizers[0].get('name')!r}, and --target's ({identity['name']!r}) "
            "tokenizes differently: its keys would match none of the files; pass the --target that filled it"
        )
    lengths = list(manifest.get("max_lengths") or [])
    if max_length is not None and lengths and max_length not in lengths and not manifest.get("files_before_manifest"):
        raise CacheMismatchError(
            f"--max-length {max_length} disagrees with {where}, filled at --max-length {lengths}: leave --max-length out "
            "to prune with those"
        )
    if max_length is None and (not lengths or manifest.get("files_before_manifest")):
        reason = ("it holds files from before manifests existed" if manifest.get("files_before_manifest")
                  else "its manifest records no max length")
        raise CacheMismatchError(f"{where}: {reason}, so the keys to keep are unknown: pass --max-length (the value the training runs used)")
    if max_length is not None and max_length not in lengths:
        lengths.append(max_length)
    return _keys_at(sources, tokenizer, sorted(lengths))


def _keys_at(sources: list[str], tokenizer, lengths: list[int]) -> set[str]:
    keys = set()
    for length in lengths:
        keys |= sequence_keys(sources, tokenizer, length)
    return keys


def compact_cache(cache_dir: str | Path, storage: str = "fp8", keep: set[str] | None = None, dry_run: bool = False) -> dict:
    """Rewrite every file of ``cache_dir`` in ``storage`` and, when ``keep`` is given, delete the
    files whose key is not in it. Returns counts and sizes in bytes before and after.

    ``cache_dir`` must be a cache (see :func:`~modeling_dflare.training.features.check_is_cache`);
    only cache files (``<key>.pt``) are looked at, and a file that is no cache payload is counted
    as unreadable and left alone (or deleted as a file of a key not kept). The cache's lock is held
    alone for the whole run, so no training run writes into the folder meanwhile."""
    folder = Path(cache_dir)
    manifest = check_is_cache(folder)
    check_storage(storage, "--storage")
    if keep is not None and not keep:
        raise ValueError("--keep-data tokenizes to no sequence: that would delete the whole cache (expected answer folders with answers)")
    with cache_lock(folder, exclusive=not dry_run):
        stats = _compact(folder, storage, keep, dry_run)
        if manifest is not None and not dry_run:
            update_manifest(folder, storage=storage, locked=True)
    logger.info("hidden-state cache %s: %s", folder, stats)
    return stats


def _compact(folder: Path, storage: str, keep: set[str] | None, dry_run: bool) -> dict:
    files = sorted(p for p in folder.glob("*.pt") if CACHE_FILE.fullmatch(p.name))
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
        if cached is None or payload_problem(cached) is not None:  # cut short by a crash: training recomputes it
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
    return stats


def add_arguments(parser) -> None:
    parser.add_argument("hidden_cache", help="the hidden-state cache folder (as given to dflare train --hidden-cache)")
    parser.add_argument("--storage", choices=STORAGES, default="fp8", help="rewrite every file in this storage (default fp8)")
    parser.add_argument(
        "--keep-data",
        default=None,
        help="comma-separated answer folders (training and held-out) whose sequences to keep; every other file is deleted",
    )
    parser.add_argument(
        "--max-length", type=int, default=None,
        help="the --max-length the kept data trains at (it sets the keys; default: the ones the cache's manifest records)",
    )
    parser.add_argument("--target", default=None, help="target folder or GGUF (default: the embedded SmolLM2) for its tokenizer")
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted and rewritten; change nothing")
    from ..chat_templates import add_prompt_format_arguments

    add_prompt_format_arguments(parser)  # as the training run that filled the cache had them: they shape the keys


def run(args) -> int:
    """``dflare cache``: compact (and with ``--keep-data`` prune) a hidden-state cache."""
    keep = None
    if args.keep_data:
        from ..chat_templates import PromptFormat
        from ..targets import load_tokenizer

        check_is_cache(args.hidden_cache)  # before the tokenizer loads
        sources = [s for s in args.keep_data.split(",") if s]
        keep = keep_keys(args.hidden_cache, sources, load_tokenizer(args.target, PromptFormat.from_args(args)), args.max_length)
    stats = compact_cache(args.hidden_cache, args.storage, keep, args.dry_run)
    mib = 1024 * 1024
    verb = "would be" if args.dry_run else "were"
    print(
        f"{stats['files']} files, {stats['bytes_before'] / mib:,.0f} MiB -> {stats['bytes_after'] / mib:,.0f} MiB"
        f"{' (estimated)' if args.dry_run else ''}: {stats['rewritten']} {verb} rewritten as {args.storage}, "
        f"{stats['deleted']} ({stats['deleted_bytes'] / mib:,.0f} MiB) {verb} deleted, {stats['unreadable']} unreadable"
    )
    return 0


__all__ = ["compact_cache", "keep_keys", "sequence_keys"]
