"""Diagnostic (not part of the package; run 2026-11-28): how far a prompt-lookup continuation follows held-out
answers at each position, by longest and shortest n-gram (tokens only, no model).

Run: PYTHONPATH=. python docs/analysis/lookup_ngrams.py HELDOUT[,HELDOUT...]
"""
import sys, torch
from modeling_dflare.modeling_dflare import ngram_continuation
from modeling_dflare.regenerate import read_regenerated
from modeling_dflare.targets import load_tokenizer
torch.set_num_threads(1)
tok = load_tokenizer(None)
for heldout in sys.argv[1].split(","):
    convs = read_regenerated(heldout)[:24]
    seqs = []
    for c in convs:
        prompt = tok.apply_chat_template(c.messages[:1], add_generation_prompt=True, tokenize=False)
        full = prompt + c.messages[1]["content"]
        p_ids = tok(prompt).input_ids; ids = tok(full).input_ids
        seqs.append((torch.tensor(ids[:512+256]), len(p_ids)))
    for max_n in (2, 3, 4, 5, 6, 8):
        for min_n in (1, 2, 3):
            if min_n > max_n: continue
            props = first_ok = matched = positions = 0
            for ids, first in seqs:
                for end in range(first + 1, ids.numel() - 1):
                    positions += 1
                    found = ngram_continuation(ids[:end], max_n, 7, min_n)
                    if found.numel() == 0: continue
                    truth = ids[end:end + found.numel()]
                    m = int((found[:truth.numel()] == truth).long().cumprod(0).sum())
                    props += 1; first_ok += m > 0; matched += m
            print(f"{heldout.split('/')[1]:22s} max_n {max_n} min_n {min_n}: proposes at {props/positions:.2f} of positions, first right {first_ok/max(props,1):.2f}, matched/proposal {matched/max(props,1):.2f}, matched/position {matched/positions:.3f}", flush=True)
