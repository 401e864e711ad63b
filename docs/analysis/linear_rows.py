"""How the cost of a SmolLM2-sized stack of fp32 linears grows with the rows it multiplies.

Random weights of the target's shapes (30 layers of q, k, v, o, gate, up and down; hidden 576,
kv 192, MLP 1536; the 49,152-row head apart), each product timed as the median of 10 after 3
warm-ups, for 1-8 rows and four ways of computing ``x @ W.T``: ``F.linear`` (what the stock
target runs), a product with a contiguous transposed copy of the weight, ``W @ x.T`` and a batched
product. Run from the repository root on an otherwise quiet machine:

    python docs/analysis/linear_rows.py [THREADS]   # default 2
"""
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in) per layer


def median_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(threads: int = 2) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    weights = [torch.randn(out, inp) for _ in range(30) for out, inp in SHAPES]
    transposed = [w.t().contiguous() for w in weights]
    head = torch.randn(49152, 576)
    print(f"{threads} threads; ms per 30 layers' linears (the head apart)")
    print("| rows | F.linear | x @ W.T (contiguous copy) | W @ x.T | batched | head, F.linear |")
    print("|---|---|---|---|---|---|")
    for rows in range(1, 9):
        x = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
        linear = median_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights])
        copy = median_ms(lambda: [x[t.shape[0]] @ t for t in transposed])
        flipped = median_ms(lambda: [w @ x[w.shape[1]].t() for w in weights])
        batched = median_ms(lambda: [torch.matmul(x[w.shape[1]][None], w.t()[None]) for w in weights])
        top = median_ms(lambda: F.linear(x[576], head))
        print(f"| {rows} | {linear:.1f} | {copy:.1f} | {flipped:.1f} | {batched:.1f} | {top:.1f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
