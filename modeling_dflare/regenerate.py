"""Regenerate responses with the target itself, so the draft learns the target's own distribution.

Greedy answers (the default) are the ones generation meets. ``--sample`` answers the same prompts
again at a temperature, each answer stored under ``<prompt id>#sample-s<seed>-t<temperature>``: more
contexts on which the draft learns the target's greedy next tokens (training labels are the
target's own choices wherever the data agrees with them), from prompts the data already has.
``--turn K`` answers the K-th user turn of multi-turn chats after their own earlier turns
(``<prompt id>#turn<K>``): new questions, in longer contexts than first turns give. A
folder of sampled answers trains beside the greedy one (``--data greedy,sampled``); the held-out
splits follow the prompt's id, so a prompt's answers never straddle them.

Responses are written to shards ``shard-NNNNN.jsonl`` under the output folder, each written
atomically. A restarted run reads the finished shards and continues with the prompts not yet
answered, so an interrupted regeneration loses at most one batch. ``--worker K/N`` answers only
the K-th of N disjoint shares of the prompts (by a hash of their ids), so N processes (one thread
each on a small machine) can fill one output folder side by side: each shard takes the next free
number at the moment it is written, never one another process holds.

``dflare regenerate --pack`` folds the finished shards into one compressed ``part-NNNNN.jsonl.gz``
(what a project commits: a few MB for thousands of answers). Packed parts count as answered, so a
later run, on this machine or another, continues where the committed data stops.
"""

import contextlib
import dataclasses
import gzip
import json
import logging
import os
import re
import uuid
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chat_templates import PromptFormat, add_prompt_format_arguments
from .conversations import Conversation
from .data import VARIANT_SEPARATOR, chat_template_ids, id_hash, write_jsonl

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RegenerateConfig:
    max_prompt_tokens: int = 256
    max_new_tokens: int = 192
    batch_size: int = 32
    shard_size: int = 32
    do_sample: bool = False
    temperature: float = 0.7
    #: "fp32", "bf16" (bf16 autocast on CPU, bf16 weights on CUDA) or "auto" (bf16 where the
    #: hardware has it: CUDA, or a CPU with native bf16 such as AVX512-BF16 / AMX).
    precision: str = "auto"
    seed: int = 0
    #: which user turn to answer: 1 = the first; K > 1 answers the K-th, after the data's own turns
    turn: int = 1
    #: (K, N): answer only the prompts of share K of N (see :func:`worker_share`); None = all of them
    worker: tuple[int, int] | None = None

    @property
    def variant(self) -> str:
        """Suffix of the stored ids: '' for greedy answers to first turns, then ``#turn<K>`` for a
        later turn and ``#sample-s<seed>-t<temperature>`` for sampled answers (both, in that order)."""
        suffix = f"{VARIANT_SEPARATOR}turn{self.turn}" if self.turn > 1 else ""
        if self.do_sample:
            suffix += f"{VARIANT_SEPARATOR}sample-s{self.seed}-t{self.temperature:g}"
        return suffix


def parse_worker(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N; anything else is refused with the value and the form."""
    k, slash, n = str(spec).partition("/")
    try:
        share, shares = int(k), int(n)
    except ValueError:
        share, shares = -1, 0
    if not slash or shares < 1 or not 0 <= share < shares:
        raise ValueError(f"--worker {spec!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes")
    return share, shares


def worker_share(conversation_id: str, shares: int) -> int:
    """Which of ``shares`` disjoint shares a prompt id falls in (a hash of the id, independent of
    the held-out split's hash, so every share holds the same mix)."""
    return id_hash("worker/" + conversation_id) % shares


def _shard_number(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def write_new_shard(out_dir: Path, records: list[dict]) -> Path:
    """Write ``records`` as the next free ``shard-NNNNN.jsonl``, safely beside other writers.

    The records go to a file of this process's own first; then the first shard name not taken is
    claimed by creating it exclusively (creation fails where another process got there first) and
    the finished file is renamed onto it, so two processes filling one folder never overwrite each
    other's shard. A shard is empty, never half-written, between the claim and the rename.
    """
    tmp = out_dir / f".shard-{os.getpid()}.jsonl.tmp"
    write_jsonl(tmp, records)
    number = max((_shard_number(p) for p in out_dir.glob("shard-*.jsonl")), default=-1) + 1
    while True:
        shard = out_dir / f"shard-{number:05d}.jsonl"
        try:
            os.close(os.open(shard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            number += 1
            continue
        tmp.replace(shard)
        return shard


def answer_files(out_dir: Path) -> list[Path]:
    """Packed parts first, then loose shards, each in name order (temporary files are ignored)."""
    return sorted(out_dir.glob("part-*.jsonl.gz")) + sorted(out_dir.glob("shard-*.jsonl"))


class AnswerFileError(ValueError):
    """A line of an answer file (packed part or shard) that is no JSON record: the file and line are named."""


def _iter_records(out_dir: Path):
    for path in answer_files(out_dir):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            number = 0
            try:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as error:
                        raise AnswerFileError(
                            f"{path}, line {number}: not a JSON record ({error}); the file is torn or was edited: "
                            "restore it, or move it out of the folder and regenerate its answers"
                        ) from None
                    if not isinstance(record, dict) or "id" not in record or "messages" not in record:
                        raise AnswerFileError(f"{path}, line {number}: a record without 'id' and 'messages'")
                    yield record
            except (EOFError, OSError, UnicodeDecodeError, zlib.error) as error:  # a compressed part cut short
                raise AnswerFileError(f"{path}, line {number + 1}: unreadable ({error}); restore the file") from None


def done_ids(out_dir: Path) -> set[str]:
    """Ids already answered in packed parts or finished shards."""
    return {record["id"] for record in _iter_records(Path(out_dir))}


def read_regenerated(out_dir: str | Path) -> list[Conversation]:
    """All regenerated conversations in an output folder (packed parts and loose shards)."""
    return [Conversation(record["id"], record["messages"]) for record in _iter_records(Path(out_dir))]


_PART = re.compile(r"part-(\d+)\.jsonl\.gz")


def pack_shards(out_dir: str | Path) -> Path | None:
    """Fold the loose shards into one new ``part-NNNNN.jsonl.gz``; returns it (None: nothing to pack).

    The part is numbered after the highest existing one (not by their count: a gap in the numbers
    would otherwise make the new part overwrite the last one) and claimed by exclusive creation, so
    it never replaces an existing part, whoever else packs the folder at the same time. It is
    written under a temporary name of this process's own and renamed onto the claim before any
    shard is removed, so an interruption leaves either the shards or the part, never neither.
    Every shard is read (and checked to be JSON records) before anything is written.
    """
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("shard-*.jsonl"))
    if not shards:
        return None
    contents = []
    for shard in shards:
        data = shard.read_bytes()
        # lines end at "\n" only, as the readers split them: str.splitlines() would also break a
        # record at a U+2028 / U+2029 / U+0085 an answer holds (written raw, ensure_ascii=False)
        for number, line in enumerate(data.decode("utf-8").split("\n"), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as error:
                    raise AnswerFileError(f"{shard}, line {number}: not a JSON record ({error}); nothing was packed") from None
        contents.append(data if data.endswith(b"\n") or not data else data + b"\n")
    tmp = out_dir / f".part-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl.gz.tmp"
    try:
        # mtime=0: the same answers always give the same bytes, so git sees no spurious change.
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            for data in contents:
                gz.write(data)
        os.chmod(tmp, 0o644)
        numbers = [int(m.group(1)) for p in out_dir.glob("part-*.jsonl.gz") if (m := _PART.fullmatch(p.name))]
        number = max(numbers, default=-1) + 1
        while True:
            part = out_dir / f"part-{number:05d}.jsonl.gz"
            try:
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                number += 1
                continue
            break
        tmp.replace(part)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for shard in shards:
        shard.unlink()
    return part


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" where it is native (measured 1.25x faster generation on an AVX512-BF16 CPU)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: expected 'auto', 'fp32' or 'bf16'")
    if precision == "auto":
        from .cpu_kernels_dflare import bf16_is_native

        return "bf16" if (str(device).startswith("cuda") or bf16_is_native()) else "fp32"
    return precision


def cpu_autocast(precision: str, device: str):
    """bf16 autocast for a CPU target in bf16 mode (a CUDA target is loaded in bf16 instead)."""
    if precision == "bf16" and not str(device).startswith("cuda"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _encode_prompts(tokenizer, conversations: list[Conversation], max_prompt_tokens: int, limit: int | None = None, turn: int = 1):
    """Chat-templated prompts of user turn ``turn`` (at most ``limit``), and how many were skipped:
    ``{"too long": prompts over the length limit, "no such turn": chats with fewer user turns}``."""
    encoded, skipped = [], {"too long": 0, "no such turn": 0}
    for conversation in conversations:
        if limit is not None and len(encoded) >= limit:
            break
        prompt = conversation.first_prompt if turn == 1 else conversation.prompt_at(turn)
        if prompt is None:
            skipped["no such turn"] += 1
            continue
        ids = chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            skipped["too long"] += 1
            continue
        encoded.append((conversation, prompt, ids))
    return encoded, skipped


@torch.inference_mode()
def _generate_batch(target, tokenizer, batch, config: RegenerateConfig) -> list[str]:
    pad = tokenizer.pad_token_id
    width = max(len(ids) for _, _, ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, _, ids) in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = target.device
    with cpu_autocast(config.precision, str(device)):
        out = target.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def regenerate(
    target,
    tokenizer,
    conversations: list[Conversation],
    out_dir: str | Path,
    config: RegenerateConfig | None = None,
    limit: int | None = None,
) -> Path:
    """Answer the first (or ``config.turn``-th) user turn of each conversation with the target; resumable.

    ``limit`` caps how many of ``conversations`` (of this worker's share, with ``config.worker``)
    end up answered in ``out_dir`` (answers already there count), after prompts over
    ``max_prompt_tokens`` are skipped.
    """
    config = config or RegenerateConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished, variant = done_ids(out_dir), config.variant
    if config.worker is not None:
        share, shares = config.worker
        conversations = [c for c in conversations if worker_share(c.id, shares) == share]
    todo = [c for c in conversations if c.id + variant not in finished]
    remaining = None if limit is None else max(0, limit - sum(1 for c in conversations if c.id + variant in finished))
    if config.do_sample:  # reproducible for an uninterrupted run (a resumed one draws afresh from its seed)
        torch.manual_seed(config.seed + len(finished))
    encoded, skipped = _encode_prompts(tokenizer, todo, config.max_prompt_tokens, remaining, config.turn)
    if skipped["too long"]:
        logger.info("skipped %d prompts longer than %d tokens", skipped["too long"], config.max_prompt_tokens)
    if skipped["no such turn"]:
        logger.info("skipped %d conversations with fewer than %d user turns", skipped["no such turn"], config.turn)
    # Within windows of 8 batches, prompts of similar length share a batch (less left padding);
    # the windows keep the dataset order, so the first answers arrive early and the order is stable.
    window = 8 * config.batch_size
    encoded = [
        item
        for start in range(0, len(encoded), window)
        for item in sorted(encoded[start : start + window], key=lambda item: len(item[2]))
    ]
    pending: list[dict] = []
    with tqdm(total=len(encoded), desc="regenerating", unit="prompt") as bar:
        for start in range(0, len(encoded), config.batch_size):
            batch = encoded[start : start + config.batch_size]
            for (conversation, prompt, _), response in zip(batch, _generate_batch(target, tokenizer, batch, config)):
                if response:
                    pending.append(
                        {"id": conversation.id + variant, "messages": prompt + [{"role": "assistant", "content": response}]}
                    )
            bar.update(len(batch))
            if len(pending) >= config.shard_size or start + config.batch_size >= len(encoded):
                if pending:
                    write_new_shard(out_dir, pending)
                    pending = []
    return out_dir


def write_answer_card(args, config: RegenerateConfig, info, prompt_format: PromptFormat) -> Path:
    """Record in the output folder's data card where its prompts come from (the ``--data`` source and
    any ``--dataset``), which target answered them and how: what a model card trained on it will say."""
    from .publish_metadata import data_source_entry, trained_against, write_data_card
    from .target_info import target_info

    decoding = f"sampled at temperature {config.temperature:g} (seed {config.seed})" if config.do_sample else "greedy"
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return write_data_card(
        args.output_dir, data_source_entry(args.data, args.dataset),
        target=trained_against(info or target_info(args.target)), prompt_format=prompt_format.describe(),
        answers=f"{decoding}, up to {config.max_new_tokens} new tokens, user turn {config.turn}, {args.split} split, {config.precision}",
    )


def add_arguments(parser) -> None:
    parser.add_argument("--target", default=None, help="target folder or .gguf (default: embedded SmolLM2)")
    parser.add_argument(
        "--data", default="sharegpt",
        help="'sharegpt', 'gsm-symbolic' (math word problems), 'codeio' (Python tasks), 'pystubs' (Python standard-library "
        "signatures and docstrings to implement), 'pylibs' (the same from networkx, numpy, mpmath, packaging, jinja2), "
        "'ifeval', 'ifbench', 'arena-hard', 'longwrite', 'writingbench' (instruction, chat and writing prompts), "
        "'truthfulqa' (factual questions), a .json array or a .jsonl file",
    )
    parser.add_argument("--output-dir", required=True, help="folder for the resumable response shards")
    parser.add_argument(
        "--split", choices=("train", "heldout"), default="train",
        help="which hash split to answer (heldout = its tune half; the report half stays for the benchmark)",
    )
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many conversations")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the conversation order (and, with --sample, the sampling seed)")
    defaults = RegenerateConfig()
    for field in dataclasses.fields(RegenerateConfig):
        if field.type in ("int", int) and field.name not in ("seed", "turn"):  # --seed is the shuffle seed above, --turn below
            parser.add_argument("--" + field.name.replace("_", "-"), type=int, default=getattr(defaults, field.name))
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="bf16 autocast on CPU / bf16 weights on CUDA; auto = bf16 where the hardware has it",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process when two run)")
    parser.add_argument("--pack", action="store_true", help="only fold finished shards into a compressed part file")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument(
        "--turn", type=int, default=1,
        help="answer the K-th user turn, after the conversation's own earlier turns (stored as <id>#turn<K>; default 1)",
    )
    parser.add_argument(
        "--worker", default=None, metavar="K/N",
        help="answer only share K of N disjoint shares of the prompts, so N processes can fill one "
        "output folder side by side (e.g. 0/2 and 1/2, --threads 1 each; stop them before --pack)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_prompt_format_arguments(parser)
    parser.add_argument(
        "--dataset", action="append", default=None, metavar="ORG/NAME",
        help="the Hub dataset the --data prompts come from (repeatable), recorded in the folder's data card for the model "
        "card (the built-in sources name theirs themselves)",
    )


def run(args) -> int:
    import random

    from .data import read_conversations, split_conversations, split_heldout
    from .target_info import check_prompt_format
    from .targets import _split_source, load_target, load_tokenizer

    if args.pack:
        part = pack_shards(args.output_dir)
        logger.info("packed into %s" % part if part else "no loose shards to pack in %s" % args.output_dir)
        return 0
    if args.turn < 1:
        raise ValueError(f"--turn {args.turn}: expected 1 (the first user turn) or more")
    worker = parse_worker(args.worker) if args.worker is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)
    _split_source(args.target)  # a missing target path fails here, before the data is read
    prompt_format = PromptFormat.from_args(args)
    info = check_prompt_format(args.target, prompt_format)  # so does a target without a chat template
    conversations, report = read_conversations(args.data)  # so does an unknown --data, before the target loads
    train, heldout = split_conversations(conversations)
    chosen = train if args.split == "train" else split_heldout(heldout)[0]
    random.Random(args.seed).shuffle(chosen)
    config = RegenerateConfig(
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        do_sample=args.sample,
        temperature=args.temperature,
        precision=resolve_precision(args.precision, args.device),
        seed=args.seed,
        turn=args.turn,
        worker=worker,
    )
    logger.info("regenerating in %s on %s", config.precision, args.device)
    dtype = torch.bfloat16 if args.device.startswith("cuda") and config.precision == "bf16" else torch.float32
    target = load_target(args.target, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(args.target, prompt_format)
    write_answer_card(args, config, info, prompt_format)
    regenerate(target, tokenizer, chosen, args.output_dir, config, limit=args.limit)
    logger.info("regenerated conversations in %s: %d", args.output_dir, len(read_regenerated(args.output_dir)))
    return 0
