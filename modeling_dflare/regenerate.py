"""Regenerate responses with the target itself, so the draft learns the target's own distribution.

Responses are written to shards ``shard-NNNNN.jsonl`` under the output folder, each written
atomically. A restarted run reads the finished shards and continues with the prompts not yet
answered, so an interrupted regeneration loses at most one batch.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Conversation, chat_template_ids, write_jsonl

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RegenerateConfig:
    max_prompt_tokens: int = 256
    max_new_tokens: int = 192
    batch_size: int = 32
    shard_size: int = 32
    do_sample: bool = False
    temperature: float = 0.7


def done_ids(out_dir: Path) -> set[str]:
    """Ids already answered in finished shards (temporary files are ignored)."""
    ids = set()
    for shard in sorted(out_dir.glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as handle:
            ids.update(json.loads(line)["id"] for line in handle if line.strip())
    return ids


def read_regenerated(out_dir: str | Path) -> list[Conversation]:
    """All regenerated conversations in an output folder."""
    conversations = []
    for shard in sorted(Path(out_dir).glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    conversations.append(Conversation(record["id"], record["messages"]))
    return conversations


def _encode_prompts(tokenizer, conversations: list[Conversation], max_prompt_tokens: int):
    """Chat-templated prompt ids; prompts over the limit are skipped and counted."""
    encoded, too_long = [], 0
    for conversation in conversations:
        prompt = conversation.first_prompt
        ids = chat_template_ids(tokenizer, prompt, add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        encoded.append((conversation, prompt, ids))
    return encoded, too_long


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
) -> Path:
    """Answer the first user turn of each conversation with the target; resumable."""
    config = config or RegenerateConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = done_ids(out_dir)
    todo = [c for c in conversations if c.id not in finished]
    encoded, too_long = _encode_prompts(tokenizer, todo, config.max_prompt_tokens)
    if too_long:
        logger.info("skipped %d prompts longer than %d tokens", too_long, config.max_prompt_tokens)
    next_shard = len(list(out_dir.glob("shard-*.jsonl")))
    pending: list[dict] = []
    with tqdm(total=len(encoded), desc="regenerating", unit="prompt") as bar:
        # Batches keep the dataset order so that a resumed run produces the same shards.
        for start in range(0, len(encoded), config.batch_size):
            batch = encoded[start : start + config.batch_size]
            for (conversation, prompt, _), response in zip(batch, _generate_batch(target, tokenizer, batch, config)):
                if response:
                    pending.append(
                        {"id": conversation.id, "messages": prompt + [{"role": "assistant", "content": response}]}
                    )
            bar.update(len(batch))
            if len(pending) >= config.shard_size or start + config.batch_size >= len(encoded):
                if pending:
                    write_jsonl(out_dir / f"shard-{next_shard:05d}.jsonl", pending)
                    next_shard += 1
                    pending = []
    return out_dir


def add_arguments(parser) -> None:
    parser.add_argument("--target", default=None, help="target folder or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--data", default="sharegpt", help="'sharegpt', a .json array or a .jsonl file")
    parser.add_argument("--output-dir", required=True, help="folder for the resumable response shards")
    parser.add_argument("--split", choices=("train", "heldout"), default="train", help="which hash split to answer")
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many conversations")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the conversation order")
    defaults = RegenerateConfig()
    for field in dataclasses.fields(RegenerateConfig):
        if field.type in ("int", int):
            parser.add_argument("--" + field.name.replace("_", "-"), type=int, default=getattr(defaults, field.name))
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    import random

    from .data import read_conversations, split_conversations
    from .targets import load_target, load_tokenizer

    conversations, report = read_conversations(args.data)
    logger.info(report.summary())
    train, heldout = split_conversations(conversations)
    chosen = train if args.split == "train" else heldout
    random.Random(args.seed).shuffle(chosen)
    if args.limit:
        chosen = chosen[: args.limit]
    config = RegenerateConfig(
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        do_sample=args.sample,
        temperature=args.temperature,
    )
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    target = load_target(args.target, dtype=dtype, device=args.device)
    regenerate(target, load_tokenizer(args.target), chosen, args.output_dir, config)
    logger.info("regenerated conversations in %s: %d", args.output_dir, len(read_regenerated(args.output_dir)))
    return 0
