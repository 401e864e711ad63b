"""Diagnostic (not part of the package; run 2026-11-28, 2-core AVX-512 Xeon): r18's held-out implied and
walked acceptance when its features are read from bf16 vs fp8 cache files of the same held-out answers
(result: fp8_eval_r18_2026-11-28.json).

Run: PYTHONPATH=. python docs/analysis/fp8_eval.py  (copies the held-out files out of runs/hidden-cache)
"""
import json, shutil, sys
from pathlib import Path
from modeling_dflare.targets import load_target, load_tokenizer
from modeling_dflare.training.cache import compact_cache, sequence_keys
from modeling_dflare.training.evaluate import evaluate_draft
import torch
torch.set_num_threads(1)
sources = ["datasets/smollm2-codeio/heldout", "datasets/smollm2-sharegpt/heldout", "datasets/smollm2-pystubs/heldout", "datasets/smollm2-gsm-symbolic/heldout"]
tok = load_tokenizer(None); target = load_target(None)
keys = sequence_keys(sources, tok, 768)
out = {}
for storage in ("bf16", "fp8"):
    d = Path(f"/tmp/cache-{storage}"); d.mkdir(exist_ok=True)
    for k in keys:
        src = Path("runs/hidden-cache") / f"{k}.pt"
        if src.exists() and not (d / src.name).exists():
            shutil.copy(src, d / src.name)
    if storage == "fp8":
        # files missing from the shared cache are computed into the bf16 copy first
        for f in Path("/tmp/cache-bf16").glob("*.pt"):
            if not (d / f.name).exists(): shutil.copy(f, d / f.name)
        print(compact_cache(d, "fp8"))
    r = evaluate_draft("drafts/smollm2-dflare", ",".join(sources), target=target, tokenizer=tok, hidden_cache=str(d))
    out[storage] = {s: {k: v for k, v in rep.items() if k in ("acc", "implied_tau", "walk_tau", "loss", "answers")} for s, rep in r.items()}
    print(storage, json.dumps(out[storage], indent=1), flush=True)
json.dump(out, open("runs/analysis/fp8_eval.json", "w"), indent=1)
