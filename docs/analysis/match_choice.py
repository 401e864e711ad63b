"""Diagnostic (not part of the package; run 2026-11-28): the hybrid's lookup takes the most recent earlier
occurrence of the longest matching n-gram (2-6). When several occurrences continue differently, how
many more tokens of the held-out answer (up to 7) would another choice match? Tokens only, no model:
"vote" takes the most common next token among the occurrences; "first_judge" is a perfect judge of
the first token (an upper bound for a draft-guided choice that scores each candidate's first token);
"oracle" the best occurrence.

Run: PYTHONPATH=. python docs/analysis/match_choice.py HELDOUT[,HELDOUT...]
Result on 2026-11-28 (32 answers each), matched tokens per match, recent / vote / first_judge / oracle:
pystubs 4.314 / 4.299 / 4.367 / 4.923; CodeI/O 4.172 / 4.194 / 4.313 / 4.617;
chat 4.527 / 4.497 / 4.621 / 5.141; math 2.806 / 2.764 / 2.922 / 3.088.
"""
import sys, torch
from collections import Counter
from modeling_dflare.regenerate import read_regenerated
from modeling_dflare.targets import load_tokenizer
torch.set_num_threads(1)
tok = load_tokenizer(None)
def hits_of(seq, max_n, min_n):
    L = seq.numel()
    for n in range(min(max_n, L - 1), max(min_n, 1) - 1, -1):
        pattern = seq[-n:]
        windows = seq[:-1].unfold(0, n, 1)
        hits = (windows == pattern).all(dim=1).nonzero().flatten()
        if hits.numel():
            return [int(h) + n for h in hits]
    return []
for heldout in sys.argv[1].split(","):
    convs = read_regenerated(heldout)[:32]
    tot = Counter()
    for c in convs:
        prompt = tok.apply_chat_template(c.messages[:1], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor(tok(prompt + c.messages[1]["content"]).input_ids[:768]); first = len(tok(prompt).input_ids)
        for end in range(first + 1, ids.numel() - 1):
            seq = ids[:end]; hs = hits_of(seq, 6, 2)
            if not hs: continue
            truth = ids[end:end + 7]
            def m(start):
                f = seq[start:start + 7]; k = min(f.numel(), truth.numel())
                return int((f[:k] == truth[:k]).long().cumprod(0).sum()) if k else 0
            conts = {}
            for h in hs:  # distinct continuations, most recent first
                key = tuple(seq[h:h + 7].tolist())
                if key and key not in conts: conts[key] = h
            tot["matches"] += 1; tot["multi"] += len(conts) > 1
            recent = m(hs[-1]); best = max(m(h) for h in hs)
            firsts = Counter(seq[h].item() for h in hs if h < seq.numel())
            vote_tok = firsts.most_common(1)[0][0] if firsts else None
            vote = max((h for h in hs if h < seq.numel() and seq[h].item() == vote_tok), default=hs[-1])
            # a perfect first-token judge: most recent hit whose first token is the truth's
            judged = max((h for h in hs if h < seq.numel() and seq[h].item() == truth[0].item()), default=hs[-1])
            tot["recent"] += recent; tot["oracle"] += best; tot["vote"] += m(vote); tot["first_judge"] += m(judged)
    n = tot["matches"]
    print(heldout, dict(tot), {k: round(tot[k] / n, 3) for k in ("recent", "vote", "first_judge", "oracle")}, "multi share", round(tot["multi"] / n, 3), flush=True)
