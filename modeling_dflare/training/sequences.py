"""Training data: conversations -> chat-templated token sequences with the response marked.

Sources are regenerated-answer folders (:mod:`modeling_dflare.regenerate`), ShareGPT, or JSON /
JSONL files; held-out conversations (a hash split, or an explicit ``--heldout``) never train. A run
tokenises its data once into a :class:`TrainingData` (train and held-out sequences, their source
counts and fingerprint, the draft-vocabulary answers), which the loop passes down.
"""

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from ..conversations import SOURCES, Conversation
from ..data import chat_template_ids, prompt_id, split_conversations, split_heldout
from .args import TrainArgs, TrainingInputError

logger = logging.getLogger(__name__)

#: Held-out sequences a training run keeps: evaluated at each ``eval_every`` and at the end.
HELDOUT_SEQUENCES = 64


@dataclasses.dataclass
class Sequence:
    """A tokenised conversation; ``response_start`` is the first token of the assistant reply."""

    id: str
    input_ids: torch.LongTensor
    response_start: int


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def tokenize_conversations(
    tokenizer, conversations, max_length: int, limit: int | None = None
) -> tuple[list[Sequence], dict[str, int]]:
    """Chat-template each conversation (up to ``limit`` kept); the last assistant turn is the
    response and everything before it the prompt. Counts what is skipped, by reason."""
    from tqdm.auto import tqdm

    sequences = []
    skipped = {"no assistant reply": 0, "no user turn before the reply": 0, "response cut off by max_length": 0}
    total = len(conversations) if limit is None else min(limit, len(conversations))
    for conversation in tqdm(conversations, desc="tokenising", unit="conv", total=total, disable=total < 500, leave=False):
        if limit is not None and len(sequences) >= limit:
            break
        messages = conversation.messages
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not messages[last]["content"].strip():
            skipped["no assistant reply"] += 1
            continue
        if not any(m["role"] == "user" for m in messages[:last]):
            skipped["no user turn before the reply"] += 1
            continue
        prompt = chat_template_ids(tokenizer, messages[:last], add_generation_prompt=True)
        full = chat_template_ids(tokenizer, messages[: last + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or len(prompt) + 2 > max_length:
            skipped["response cut off by max_length"] += 1
            continue
        sequences.append(Sequence(conversation.id, torch.tensor(full[:max_length]), len(prompt)))
    return sequences, skipped


def first_exchange(conversation):
    """The first user turn and the assistant reply after it (system turns before it are kept).

    Assistant turns before the first user turn are dropped: a third of ShareGPT opens with one,
    and those conversations then train on their first real exchange instead of being skipped.
    """
    messages = conversation.messages
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if user is None:
        return conversation
    reply = next((i for i in range(user + 1, len(messages)) if messages[i]["role"] == "assistant"), None)
    if reply is None:
        return conversation
    system = [m for m in messages[:user] if m["role"] == "system"]
    return Conversation(conversation.id, system + messages[user : reply + 1])


def check_answer_folder(folder: Path) -> None:
    """Refuse a ``--data`` folder that would train on less than it holds.

    A folder is read as a regeneration's output: ``part-*.jsonl.gz`` and ``shard-*.jsonl`` files.
    Any other conversation file in it (say ``extra.jsonl.gz`` linked in by hand) would be skipped
    without a word, so it is an error naming the files and the two ways out; a folder with no
    answer file at all is one too.
    """
    from ..publish_metadata import DATA_CARD
    from ..regenerate import answer_files

    read = set(answer_files(folder))
    data_like = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
    unread = sorted(p.name for p in folder.iterdir() if p.name.endswith(data_like) and p not in read and p.name != DATA_CARD)
    if unread:
        raise ValueError(
            f"data folder {str(folder)!r}: {', '.join(unread)} would not be read (a folder is read as "
            "regenerated answers: part-*.jsonl.gz and shard-*.jsonl files only); rename them to "
            "part-NNNNN.jsonl.gz, or pass them as separate sources: --data FOLDER,FILE"
        )
    if not read:
        raise ValueError(
            f"data folder {str(folder)!r} holds no regenerated answers (expected part-*.jsonl.gz or "
            "shard-*.jsonl files, as `dflare regenerate` writes them)"
        )


def read_source(source: str | None) -> list:
    """Regenerated shards when ``source`` is a folder, else any reader of :mod:`modeling_dflare.data`
    (cut to the first exchange: the draft learns single-turn answers, like the demo asks)."""
    from ..data import read_conversations
    from ..regenerate import read_regenerated

    if source and Path(source).is_dir():
        check_answer_folder(Path(source))
        return read_regenerated(source)
    conversations, _ = read_conversations(source)  # the reader logs its own summary
    return [first_exchange(c) for c in conversations]


def prompt_source_of(conversation_id: str, unprefixed: str = "sharegpt") -> str:
    """The prompt source an answer's id names (``codeio/...``, ``gsm-symbolic/...``, ``pystubs/...``, ``pylibs/...``:
    the prompt sources of :data:`~modeling_dflare.conversations.SOURCES`), else ``unprefixed``."""
    prefix = conversation_id.split("/", 1)[0] if "/" in conversation_id else None
    return prefix if prefix in SOURCES and prefix != "sharegpt" else unprefixed


def count_prompt_sources(conversations: list, data: str | None) -> dict[str, int]:
    """Training conversations by where their prompts come from, for the model card.

    Answers to reasoning-gym prompts carry their source in the id (:func:`prompt_source_of`); any
    other conversation counts as ShareGPT's when ``data`` is ShareGPT (the built-in reader, or an
    answer folder whose data card says so, or whose answer files link into such a folder), else as
    ``"other"`` (the user's own data). Folder names are never read as a source
    (:func:`~modeling_dflare.publish_metadata.describe_data`).
    """
    from ..publish_metadata import unprefixed_prompt_source

    unprefixed = unprefixed_prompt_source(data)
    counts: dict[str, int] = {}
    for conversation in conversations:
        source = prompt_source_of(conversation.id, unprefixed)
        counts[source] = counts.get(source, 0) + 1
    return dict(sorted(counts.items()))


def load_training_conversations(args) -> tuple[list, list]:
    """(train, held-out) conversations. ``data`` may list several sources separated by commas;
    held-out conversations (a hash split, or ``heldout``) never reach training, and of the hash
    split only the *tune* half is evaluated (the *report* half feeds ``dflare bench`` alone)."""
    sources = (args.data or "sharegpt").split(",")
    train, heldout, seen = [], [], set()
    for source in sources:
        if args.heldout:  # an explicit held-out set: all of --data trains
            part_train, part_heldout = read_source(source), []
        else:
            part_train, part_heldout = split_conversations(read_source(source))
        # the same prompt may come regenerated and raw: keep its first occurrence only
        train += [c for c in part_train if c.id not in seen and not seen.add(c.id)]
        heldout += split_heldout(part_heldout)[0]  # the report half is for the benchmark only
    if args.heldout:
        heldout = [c for source in args.heldout.split(",") for c in read_source(source)]
        held_ids = {prompt_id(c.id) for c in heldout}  # every answer variant of a held-out prompt
        train = [c for c in train if prompt_id(c.id) not in held_ids]
    return train, heldout


def choose_draft_vocab(
    sequences: list[Sequence], size: int, vocab_size: int, always: list[int], balanced: bool = False
) -> torch.LongTensor:
    """The ``size`` most frequent response tokens (plus ``always``), by descending frequency.

    ``balanced``: each prompt source (:func:`prompt_source_of`) weighs the same, whatever its token
    count. Chosen from 3.6M chat tokens beside 0.26M code and 0.11M math tokens, a 16k vocabulary
    covered 93.8 % of held-out code answers' tokens; balanced, 98.5 % (math 96.8 -> 99.8 %, chat 97.6 -> 97.7 %).
    """
    groups: dict[str, torch.Tensor] = {}
    for sequence in sequences:
        key = prompt_source_of(sequence.id) if balanced else "all"
        counts = torch.bincount(sequence.input_ids[sequence.response_start :], minlength=vocab_size)
        groups[key] = groups[key] + counts if key in groups else counts
    frequency = sum((counts.double() / max(1, int(counts.sum())) for counts in groups.values()), torch.zeros(vocab_size, dtype=torch.double))
    frequency[torch.tensor(always, dtype=torch.long)] = frequency.max() + 1
    order = torch.argsort(frequency, descending=True, stable=True)
    return order[: min(size, vocab_size)].clone()


def data_fingerprint(sequences: list[Sequence]) -> dict:
    """How many training sequences, in which order (a hash of their ids and lengths): the step ->
    sequence stream is a function of this list, so a resumed run must see the same one."""
    digest = hashlib.sha1()
    for sequence in sequences:
        digest.update(f"{sequence.id}:{sequence.input_ids.numel()}\n".encode())
    return {"sequences": len(sequences), "sha1": digest.hexdigest()}


def vocab_sequences(args: TrainArgs, tokenizer, heldout: list[Sequence]) -> list[Sequence] | None:
    """The answers ``--draft-vocab-data`` names, tokenised (no target pass), held-out prompts left out;
    None without the flag."""
    if not args.draft_vocab_data:
        return None
    held = {prompt_id(s.id) for s in heldout}
    conversations = [c for source in args.draft_vocab_data.split(",") for c in read_source(source) if prompt_id(c.id) not in held]
    sequences, _ = tokenize_conversations(tokenizer, conversations, args.max_length)
    if not sequences:
        raise TrainingInputError(f"--draft-vocab-data {args.draft_vocab_data!r}: no answers to choose a vocabulary from")
    return sequences


@dataclasses.dataclass
class TrainingData:
    """A training run's data, tokenised once (:func:`tokenize_training_data`) and passed down: the
    draft's vocabulary, the resume check, the feature pass, the steps and the model card all read it."""

    train: list[Sequence]
    heldout: list[Sequence]
    #: training conversations left out, by reason (:func:`tokenize_conversations`)
    skipped: dict[str, int]
    #: training sequences by prompt source (:func:`count_prompt_sources`), for the model card
    prompt_sources: dict[str, int]
    #: the ``--draft-vocab-data`` answers the draft vocabulary is chosen from (None without the flag)
    vocab: list[Sequence] | None = None
    #: :func:`data_fingerprint` of ``train``, which a resumed run must match
    fingerprint: dict = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = data_fingerprint(self.train)


def tokenize_training_data(args: TrainArgs, tokenizer, train_conversations: list, heldout_conversations: list) -> TrainingData:
    """Tokenise a run's (train, held-out) conversations (:func:`load_training_conversations`) and the
    ``--draft-vocab-data`` answers; a TrainingInputError when no training sequence is usable."""
    train, skipped = tokenize_conversations(tokenizer, train_conversations, args.max_length, args.max_train_sequences)
    heldout, _ = tokenize_conversations(tokenizer, heldout_conversations, args.max_length, HELDOUT_SEQUENCES)
    if not train:
        raise TrainingInputError(f"no usable training sequences in {args.data!r} (skipped: {skipped})")
    return TrainingData(train, heldout, skipped, count_prompt_sources(train, args.data), vocab_sequences(args, tokenizer, heldout))
