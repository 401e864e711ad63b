"""Argmax against sampled proposals when sampling: per-position acceptance and tau of the shipped
DFlare draft with the SmolLM2 target, temperature 0.7 and 1.0 (no top-k / top-p), 96 new tokens,
one seed per prompt. Prompts: the first 4 / 2 / 2 of the tune half of the held-out chat / code /
math answers, never the bench's report sets. Run from the repository root:

    python docs/analysis/sampling_proposal.py   # writes runs/proposal_probe.json
"""
import itertools, json, sys, time
import torch
from transformers import AutoModel, GenerationConfig
import modeling_dflare
from modeling_dflare.cpu_kernels_dflare import fast_draft_dtype
from modeling_dflare.targets import load_target, load_tokenizer
from modeling_dflare.regenerate import read_regenerated

torch.set_num_threads(1)
target, tok = load_target(None), load_tokenizer(None)
draft = AutoModel.from_pretrained("drafts/smollm2-dflare", trust_remote_code=True, dtype=fast_draft_dtype()).eval()
prompts = []
for folder, k in (("datasets/smollm2-sharegpt/heldout", 4), ("datasets/smollm2-pystubs/heldout", 2), ("datasets/smollm2-gsm-symbolic/heldout", 2)):
    recs = list(read_regenerated(folder))[:k]
    for r in recs:
        msgs = [m for m in r.messages if m["role"] != "assistant"]
        prompts.append(tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"])
B = draft.config.block_size
res = {}
for temp, mode in itertools.product((0.7, 1.0), ("argmax", "sample")):
    proposed = [0] * B; reached = [0] * B; acc_tot = cyc = 0
    for seed, ids in enumerate(prompts):
        cfg = GenerationConfig(**target.generation_config.to_dict())
        cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens = True, temp, 0, 1.0, 96
        cfg.dflare_sampling_proposal = mode
        torch.manual_seed(seed)
        with torch.inference_mode():
            target.generate(ids, generation_config=cfg, assistant_model=draft)
        st = draft.dflare_stats
        for p, a in zip(st.proposed, st.accepted):
            for k in range(p):
                proposed[k] += 1
                reached[k] += a > k
        acc_tot += sum(st.accepted); cyc += st.cycles
    tau = (acc_tot + cyc) / cyc
    per = [round(r / p, 3) if p else None for r, p in zip(reached, proposed)][:8]
    res[f"T{temp}-{mode}"] = dict(tau=round(tau, 3), per_position=per, cycles=cyc)
    print(f"T={temp} {mode}: tau {tau:.3f}  per-position {per}", flush=True)
json.dump(res, open("runs/proposal_probe.json", "w"), indent=1)
