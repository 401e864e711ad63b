"""Diagnostic (not part of the package; run on r15, 2026-11-28, 2-core AVX-512 Xeon): hybrid proposals by
source on held-out answers' prompts.

Run: PYTHONPATH=. python docs/analysis/hybrid_sources.py DRAFT[,DRAFT] HELDOUT[,HELDOUT] OUT.json
"""
import copy, json, sys, torch
from modeling_dflare import DFlareModel
from modeling_dflare.regenerate import read_regenerated
from modeling_dflare.targets import load_target, load_tokenizer

torch.set_num_threads(1)
target, tok = load_target(None), load_tokenizer(None)
heldouts = sys.argv[2].split(",")
out = {}
for draft_dir in sys.argv[1].split(","):
    draft = DFlareModel.from_pretrained(draft_dir, dtype=torch.float32)
    for heldout in heldouts:
        convs = read_regenerated(heldout)[:12]
        for label, overrides in (("hybrid", {}), ("draft alone", {"dflare_prompt_lookup_ngram": 0})):
            tot = {"cycles": 0, "acc": 0, "d_prop": 0, "d_acc": 0, "l_prop": 0, "l_acc": 0, "first_from_lookup": 0, "first_lookup_acc": 0, "first_draft": 0, "first_draft_acc": 0, "empty": 0}
            for c in convs:
                text = tok.apply_chat_template(c.messages[:1], add_generation_prompt=True, tokenize=False)
                ids = tok(text, return_tensors="pt").input_ids[:, -512:]
                config = copy.deepcopy(target.generation_config)
                config.max_new_tokens, config.do_sample = 128, False
                for k, v in overrides.items():
                    setattr(config, k, v)
                target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, generation_config=config)
                st = draft.dflare_stats
                for p, a, d in zip(st.proposed, st.accepted, st.drafted):
                    tot["cycles"] += 1; tot["acc"] += a
                    tot["d_prop"] += d; tot["d_acc"] += min(a, d); tot["l_prop"] += p - d; tot["l_acc"] += max(0, a - d)
                    if p == 0: tot["empty"] += 1
                    elif d == 0: tot["first_from_lookup"] += 1; tot["first_lookup_acc"] += a > 0
                    else: tot["first_draft"] += 1; tot["first_draft_acc"] += a > 0
            tot["tau"] = round((tot["acc"] + tot["cycles"]) / tot["cycles"], 3)
            key = f"{draft_dir} | {heldout} | {label}"
            out[key] = tot
            print(key, json.dumps(tot), flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
