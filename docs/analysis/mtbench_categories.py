"""Per-category acceptance on MT-Bench of each shipped DFlare draft version: a learning curve per
category over the installments, each of which added a prompt source (math and code, standard-library
stubs, library stubs, instruction-following prompts, ...).

The target (fp32, greedy, as `generate` runs it) answers the 80 MT-Bench first turns once (up to
128 new tokens, the bench's length); every draft is then measured on those answers the way
training measures its held-out answers (`dflare evaluate`): first-position accuracy, the implied
acceptance length and the acceptance walked the way generation walks it (at the draft's block size,
without its confidence cut or prompt-lookup hybrid). No draft is trained or tuned on these answers;
they stay under runs/.

Drafts are draft folders or `REV` of the shipped drafts/smollm2-dflare (read with `git show`).
Run from the repository root, one thread:

    python docs/analysis/mtbench_categories.py r9=b059ef4 r14=11bdbe1 r20=55cd257 r21=runs/dflare-r21
    # writes (or adds to) docs/analysis/mtbench_categories_<date>.json and prints a table per category
"""
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

from modeling_dflare.bench_datasets import mtbench
from modeling_dflare.conversations import Conversation
from modeling_dflare.regenerate import RegenerateConfig, read_regenerated, regenerate
from modeling_dflare.targets import load_target, load_tokenizer
from modeling_dflare.training.evaluate import evaluate_draft

ANSWERS = Path("runs/mtbench-answers")
CACHE = Path("runs/mtbench-cache")
SHIPPED = "drafts/smollm2-dflare"
DRAFT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def answer_folders(target, tokenizer) -> dict[str, Path]:
    """One answer folder per category, the target's greedy fp32 answers (made once, then reused)."""
    by_category: dict[str, list[Conversation]] = {}
    for prompt in mtbench():
        by_category.setdefault(prompt.meta["category"], []).append(Conversation(prompt.id, prompt.messages))
    config = RegenerateConfig(max_prompt_tokens=1024, max_new_tokens=128, batch_size=10, shard_size=10, precision="fp32")
    folders = {}
    for category, conversations in by_category.items():
        folder = ANSWERS / category
        if len(read_regenerated(folder) if folder.exists() else []) < len(conversations):
            regenerate(target, tokenizer, conversations, folder, config)
        folders[category] = folder
    return folders


def draft_folder(name: str, spec: str) -> Path:
    """A draft folder: ``spec`` itself, or the shipped draft at git revision ``spec`` copied under runs/."""
    if Path(spec).is_dir():
        return Path(spec)
    folder = Path("runs/draft-versions") / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in DRAFT_FILES:
        if not (folder / file).exists():
            blob = subprocess.run(["git", "show", f"{spec}:{SHIPPED}/{file}"], capture_output=True, check=False)
            if blob.returncode == 0:
                (folder / file).write_bytes(blob.stdout)
    return folder


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    target, tokenizer = load_target(None), load_tokenizer(None)
    folders = answer_folders(target, tokenizer)
    heldout = ",".join(str(folder) for folder in folders.values())
    date = datetime.date.today().isoformat()
    out = Path(f"docs/analysis/mtbench_categories_{date}.json")
    results = json.loads(out.read_text())["results"] if out.exists() else {}  # later drafts join earlier ones
    for spec in specs:
        name, _, source = spec.partition("=")
        reports = evaluate_draft(draft_folder(name, source), heldout, target=target, tokenizer=tokenizer,
                                 hidden_cache=str(CACHE), max_answers=10)
        results[name] = {"revision": None if Path(source).is_dir() else source, **{category: reports[str(folder)] for category, folder in folders.items()}}
        print(name, {c: round(r["walk_tau"], 3) for c, r in results[name].items() if c != "revision"}, flush=True)
    out.write_text(json.dumps({"date": date, "answers": "MT-Bench first turns, SmolLM2 fp32 greedy, up to 128 new tokens",
                               "threads": 1, "results": results}, indent=2) + "\n")
    categories = list(folders)
    print("| draft | " + " | ".join(categories) + " | mean |")
    print("|---" * (len(categories) + 2) + "|")
    for name, row in results.items():
        taus = [row[c]["walk_tau"] for c in categories]
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in taus) + f" | {sum(taus) / len(taus):.2f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
