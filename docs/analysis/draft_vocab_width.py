"""Does a wider draft vocabulary help on MT-Bench? Coverage and acceptance of the shipped draft with
its 16,384-token vocabulary widened, without training.

The draft scores its proposals with the target's own head rows, restricted to ``draft_vocab_ids``;
a token outside them can never be proposed, so every such token in the target's answer ends an
accepted run. This script

1. counts the share of the target's MT-Bench answer tokens (the greedy fp32 answers of
   ``mtbench_categories.py``, per category) that the draft vocabulary holds;
2. widens the vocabulary to 24,576 and 32,768 ids (the shipped ids first, then the tokens most
   frequent in the committed training answers under ``datasets/``, held-out folders left out) and to
   the full vocabulary, keeping every weight, and measures each variant's walked acceptance on those
   answers as ``mtbench_categories.py`` does (``dflare evaluate``'s walk, block 8, no cut).

Run from the repository root, one thread (the answers and their target features are made once by
``mtbench_categories.py`` and reused):

    python docs/analysis/draft_vocab_width.py
    # writes docs/analysis/draft_vocab_width_<date>.json and prints a table per category
"""
import collections
import datetime
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mtbench_categories import CACHE, SHIPPED, answer_folders  # noqa: E402

from modeling_dflare.regenerate import read_regenerated  # noqa: E402
from modeling_dflare.targets import load_target, load_tokenizer  # noqa: E402
from modeling_dflare.training.evaluate import evaluate_draft  # noqa: E402

VARIANTS = Path("runs/draft-vocab-width")
WIDTHS = (24576, 32768, None)  # None: the full vocabulary


def answer_tokens(folder: Path, tokenizer) -> list[int]:
    """The token ids of every assistant answer in a regenerated folder."""
    ids = []
    for conversation in read_regenerated(folder):
        for message in conversation.messages:
            if message["role"] == "assistant":
                ids += tokenizer(message["content"], add_special_tokens=False)["input_ids"]
    return ids


def training_frequencies(tokenizer) -> collections.Counter:
    """Token counts over the committed training answers (held-out folders left out)."""
    counts = collections.Counter()
    for folder in sorted(Path("datasets").glob("*/*/")):
        if folder.name != "heldout" and any(folder.glob("*.jsonl*")):
            counts.update(answer_tokens(folder, tokenizer))
    return counts


def widened(width: int | None, state: dict, config: dict, frequent: list[int], vocab_size: int) -> Path:
    """A copy of the shipped draft whose vocabulary holds ``width`` ids (None: all), under runs/."""
    folder = VARIANTS / ("full" if width is None else f"v{width}")
    folder.mkdir(parents=True, exist_ok=True)
    state, config = dict(state), dict(config)
    if width is None:
        state.pop("draft_vocab_ids")
        config["draft_vocab_size"] = None
    else:
        ids = state["draft_vocab_ids"].tolist()
        have = set(ids)
        rest = [t for t in frequent if t not in have] + [t for t in range(vocab_size) if t not in have]
        extra = list(dict.fromkeys(rest))[: width - len(ids)]
        state["draft_vocab_ids"] = torch.tensor(ids + extra, dtype=torch.long)
        config["draft_vocab_size"] = width
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main() -> None:
    torch.set_num_threads(1)
    target, tokenizer = load_target(None), load_tokenizer(None)
    folders = answer_folders(target, tokenizer)
    state = load_file(Path(SHIPPED) / "model.safetensors")
    config = json.loads((Path(SHIPPED) / "config.json").read_text())
    shipped_ids = set(state["draft_vocab_ids"].tolist())
    coverage = {}
    for category, folder in folders.items():
        ids = answer_tokens(folder, tokenizer)
        coverage[category] = {"tokens": len(ids), "in_draft_vocab": sum(i in shipped_ids for i in ids) / len(ids)}
    frequent = [t for t, _ in training_frequencies(tokenizer).most_common()]
    drafts = {"shipped (16,384)": Path(SHIPPED)}
    for width in WIDTHS:
        drafts["full" if width is None else f"{width:,}"] = widened(width, state, config, frequent, target.config.vocab_size)
    heldout = ",".join(str(folder) for folder in folders.values())
    results = {}
    for name, folder in drafts.items():
        reports = evaluate_draft(folder, heldout, target=target, tokenizer=tokenizer, hidden_cache=str(CACHE), max_answers=10)
        results[name] = {category: reports[str(f)]["walk_tau"] for category, f in folders.items()}
        print(name, {c: round(t, 3) for c, t in results[name].items()}, flush=True)
    date = datetime.date.today().isoformat()
    out = Path(f"docs/analysis/draft_vocab_width_{date}.json")
    out.write_text(json.dumps({"date": date, "draft": SHIPPED, "threads": 1, "coverage": coverage, "walk_tau": results}, indent=2) + "\n")
    categories = list(folders)
    print("| | " + " | ".join(categories) + " | all |")
    print("|---" * (len(categories) + 2) + "|")
    total = sum(c["tokens"] for c in coverage.values())
    share = sum(c["tokens"] * c["in_draft_vocab"] for c in coverage.values()) / total
    print("| answer tokens in the draft vocabulary | " + " | ".join(f"{coverage[c]['in_draft_vocab']:.1%}" for c in categories) + f" | {share:.1%} |")
    for name, row in results.items():
        taus = [row[c] for c in categories]
        print(f"| walked τ, {name} | " + " | ".join(f"{t:.2f}" for t in taus) + f" | {sum(taus) / len(taus):.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
