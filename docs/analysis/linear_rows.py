"""How the cost of a SmolLM2-sized stack of fp32 linears grows with the rows it multiplies.

Random weights of the target's shapes (30 layers of q, k, v, o, gate, up and down; hidden 576,
kv 192, MLP 1536; the 49,152-row head apart), each product timed as the median of 10 after 3
warm-ups, for 1-8 rows and six ways of computing ``x @ W.T``: ``F.linear`` (what the stock
target runs), a product with a contiguous transposed copy of the weight, ``W @ x.T``, a batched
product, oneDNN's linear on a packed copy of the weight (the small-row kernels' ``"packed"``) and
the compiled ``"rows"`` kernel (each weight row read once for all rows). Run from the repository
root on an otherwise quiet machine:

    python docs/analysis/linear_rows.py [THREADS]   # default 2
"""
import sys
import time

import torch
import torch.nn.functional as F

from modeling_dflare.cpu_kernels_dflare import rows_kernel

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
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 4) for w in weights]
    head = torch.randn(49152, 576)
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head, 4)
    kernel = rows_kernel()
    if kernel is None:
        raise SystemExit("the 'rows' kernel did not build here (run with logging at INFO to see why)")
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    print(f"{threads} threads; ms per 30 layers' linears (the head apart)")
    print("| rows | F.linear | x @ W.T (contiguous copy) | W @ x.T | batched | oneDNN packed | rows kernel "
          "| head, F.linear | head, packed | head, rows kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows in range(1, 9):
        x = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
        linear = median_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights])
        copy = median_ms(lambda: [x[t.shape[0]] @ t for t in transposed])
        flipped = median_ms(lambda: [w @ x[w.shape[1]].t() for w in weights])
        batched = median_ms(lambda: [torch.matmul(x[w.shape[1]][None], w.t()[None]) for w in weights])
        onednn_ms = median_ms(lambda: [onednn(x[w.shape[1]], p) for w, p in zip(weights, packed)])
        rows_ms = median_ms(lambda: [kernel.rows_linear(x[w.shape[1]], w) for w in weights])
        top = median_ms(lambda: F.linear(x[576], head))
        top_packed = median_ms(lambda: onednn(x[576], head_packed))
        top_rows = median_ms(lambda: kernel.rows_linear(x[576], head))
        print(f"| {rows} | {linear:.1f} | {copy:.1f} | {flipped:.1f} | {batched:.1f} | {onednn_ms:.1f} | {rows_ms:.1f} "
              f"| {top:.1f} | {top_packed:.1f} | {top_rows:.1f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
