"""Rendering ``dflare bench`` results (the JSON it writes): a markdown table and PNG plots.

:func:`render_markdown` is what the README and the model cards paste, so it depends only on the
JSON, never on a live run: ``render_markdown(json.load(open("runs/bench/bench.json")))``.
"""

import math
from pathlib import Path
from typing import Any

from .bench_plan import PLAIN_METHODS

#: The longest n-gram dflare-hybrid looks up with a draft whose config has the hybrid off: the
#: benchmark runs with it, and a report of such a run names it.
DEFAULT_LOOKUP_NGRAM = 3


def temperature_label(value: float | None) -> str:
    """"greedy" for temperature 0 (or a row from before temperatures were recorded), else ``T=0.7``."""
    return "greedy" if not value else f"T={value:g}"


COLUMNS = (
    ("Dataset", "dataset", "{}"),
    ("Method", "method", "{}"),
    ("Decoding", "temperature", temperature_label),
    ("τ", "tau", "{:.2f}"),
    ("tok/s", "tokens_per_second", "{:.1f}"),
    ("Speedup vs plain", "speedup", "{:.2f}x"),
    ("vs plain-fast", "speedup_vs_plain_fast", "{:.2f}x"),
    ("vs plain-static", "speedup_vs_plain_static", "{:.2f}x"),
    ("Draft ms/cycle", "draft_ms_per_cycle", "{:.1f}"),
    ("Verify ms/cycle", "verify_ms_per_cycle", "{:.1f}"),
    ("Overhead ms/cycle", "overhead_ms_per_cycle", "{:.1f}"),
    ("Draft share", "draft_share", "{:.0%}"),
    ("Free-draft ceiling", "ceiling", "{:.2f}x"),
    ("% of ceiling", "ceiling_fraction", "{:.0%}"),
    ("Peak MiB", "peak_memory_mib", "{:.0f}"),
)


def _cell(value: Any, template) -> str:
    if callable(template):
        return template(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return template.format(value)


def _group(row: dict) -> tuple[str, float]:
    """(dataset, temperature) of a result row: rows of one group share a baseline."""
    return row["dataset"], row.get("temperature") or 0.0


def _group_label(dataset: str, temperature: float) -> str:
    return dataset if not temperature else f"{dataset} ({temperature_label(temperature)})"


def above_ceiling(row: dict) -> bool:
    """Whether a row's speedup over plain exceeds its own free-draft ceiling: more than a draft costing
    nothing could give at its τ, so the gain is the verify kernels' (or noise), not the drafting's."""
    speedup, ceiling = row.get("speedup"), row.get("ceiling")
    return isinstance(speedup, (int, float)) and isinstance(ceiling, (int, float)) and speedup > ceiling


#: Where the table's prompts-and-repeats column goes (after "Decoding").
BEHIND_COLUMN = 3


def render_table(results: dict) -> str:
    """The per dataset and method table (markdown), with a losslessness column (greedy rows: output
    identical to plain decoding; sampled rows cannot be compared token by token, so theirs says
    whether repeats under one seed agreed), how many prompts and timed repeats stand behind each
    row, and a speedup above the row's own free-draft ceiling flagged in its cell."""
    repeats = ((results.get("meta") or {}).get("settings") or {}).get("repeats")
    # the compiled pair's column only where that pair ran
    columns = [c for c in COLUMNS if c[1] != "speedup_vs_plain_static" or any(r.get(c[1]) is not None for r in results["results"])]
    header = [title for title, _, _ in columns] + ["Lossless"]
    header.insert(BEHIND_COLUMN, "Prompts × repeats")
    speedup_column = next(i for i, (_, key, _) in enumerate(columns) if key == "speedup")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in results["results"]:
        cells = [_cell(row.get(key), template) for _, key, template in columns]
        if above_ceiling(row):
            cells[speedup_column] = f"**{row['speedup']:.2f}x (above ceiling)**"
        cells.insert(BEHIND_COLUMN, f"{row.get('prompts', '?')} × {repeats or '?'}")
        if row.get("temperature"):
            cells.append("n/a (sampled)" if not row.get("mismatches") else f"**NO ({row['mismatches']} repeats differ)**")
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells.append("yes" if not row.get("mismatches") else f"**NO ({row['mismatches']} differ)**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_costs(results: dict) -> str:
    """Measured target forward costs behind the free-draft ceiling."""
    costs = results.get("costs", {})
    fixed = [k for k in ("matmul", "packed") if any(cost.get(f"verify_ms_small_rows_{k}") for cost in costs.values())]
    header = "| Dataset | Context tokens | t_target(1 token) ms | t_target(verify B) ms | small-row kernels: 1 token | 2 tokens | verify B |"
    lines = [header + "".join(f" {k} kernels: 2 tokens | verify B |" for k in fixed), "|---" * (7 + 2 * len(fixed)) + "|"]
    block = results["meta"]["settings"]["block_size"]
    for dataset, cost in costs.items():
        verify, small = cost["verify_ms"], cost.get("verify_ms_small_rows") or []
        row = f"| {dataset} | {cost['context_tokens']} | {verify[0]:.1f} | {verify[min(block, len(verify)) - 1]:.1f} |"
        row += f" {small[0]:.1f} | {small[1]:.1f} | {small[min(block, len(small)) - 1]:.1f} |" if len(small) > 1 else " – | – | – |"
        for kernels in fixed:
            other = cost.get(f"verify_ms_small_rows_{kernels}") or []
            row += f" {other[1]:.1f} | {other[min(block, len(other)) - 1]:.1f} |" if len(other) > 1 else " – | – |"
        lines.append(row)
    return "\n".join(lines)


def render_headline(results: dict, method: str | None = None) -> list[str]:
    """One line per dataset and temperature: ``method``'s speed relative to each alternative that ran
    (2.00x plain = twice as fast as plain; in new tokens per second, which for greedy runs, all making
    the same tokens, is the ratio of their times) and the free-draft ceiling at its τ."""
    rows = results["results"]
    if method is None:  # the headline method: the hybrid when it ran, else the draft alone
        ran = {r["method"] for r in rows}
        method = next((m for m in ("dflare-hybrid", "dflare") if m in ran), "dflare")
    lines = []
    for group in dict.fromkeys(_group(r) for r in rows):
        by_method = {r["method"]: r for r in rows if _group(r) == group}
        ours = by_method.get(method)
        if ours is None or not ours["seconds"] or not ours["tokens_per_second"]:
            continue
        parts = [
            f"{ours['tokens_per_second'] / by_method[other]['tokens_per_second']:.2f}x {other}"
            for other in by_method if other != method and by_method[other]["tokens_per_second"]
        ]
        ceiling = (
            f"; a free draft at this τ would give {ours['ceiling']:.2f}x plain ({ours['ceiling_fraction']:.0%} reached)"
            if ours.get("ceiling") is not None
            else ""
        )
        if above_ceiling(ours):
            ceiling = (f"; **FLAGGED: {ours['speedup']:.2f}x plain is above the {ours['ceiling']:.2f}x a free draft would give at "
                       "this τ, so it is no drafting gain** (the verify kernels or timing noise: compare plain-fast)")
        lines.append(f"- {_group_label(*group)}: {method} (τ {ours['tau']:.2f}) runs at " + ", ".join(parts) + ceiling)
    return lines


def render_categories(results: dict) -> list[str]:
    """Per dataset with categories (MT-Bench, CHAMP) and temperature, a table: one row per category
    and one for all of them, each speculative method's τ and speedup vs plain in its cells."""
    rows = results.get("categories") or []
    lines = []
    for group in dict.fromkeys(_group(r) for r in rows):
        chosen = [r for r in rows if _group(r) == group]
        methods = [m for m in dict.fromkeys(r["method"] for r in chosen) if m not in PLAIN_METHODS]
        overall = {r["method"]: r for r in results["results"] if _group(r) == group}
        if not methods:
            continue
        lines += ["", f"Per category, {_group_label(*group)} (τ / speedup vs plain):", "",
                  "| Category | Prompts | " + " | ".join(methods) + " |", "|---" * (2 + len(methods)) + "|"]
        for category in dict.fromkeys(r["category"] for r in chosen):
            by_method = {r["method"]: r for r in chosen if r["category"] == category}
            prompts = next(iter(by_method.values()))["prompts"]
            cells = [f"{by_method[m]['tau']:.2f} / {by_method[m]['speedup']:.2f}x" if m in by_method else "–" for m in methods]
            lines.append(f"| {category} | {prompts} | " + " | ".join(cells) + " |")
        if overall:
            prompts = next(iter(overall.values()))["prompts"]
            cells = [f"{overall[m]['tau']:.2f} / {overall[m]['speedup']:.2f}x" if m in overall else "–" for m in methods]
            lines.append(f"| **overall** | {prompts} | " + " | ".join(cells) + " |")
    return lines


def _decoding_line(settings: dict) -> str:
    """How the run decoded: greedy, and any sampling temperatures (older results: greedy)."""
    temperatures = settings.get("temperatures") or [0.0]
    sampled = [t for t in temperatures if t]
    parts = (["greedy"] if len(sampled) < len(temperatures) else []) + (
        [f"sampling at temperature {', '.join(f'{t:g}' for t in sampled)} (no top-k/top-p; plain sampling is the baseline, "
         f"speedups per new token; seed {settings.get('seed', 0)})"] if sampled else [])
    line = " and ".join(parts)
    return line[0].upper() + line[1:]


def _prompt_counts(settings: dict) -> str:
    """"8 prompts per dataset", with any dataset given its own count after it."""
    default = settings["num_prompts"]
    own = {d: n for d, n in (settings.get("num_prompts_by_dataset") or {}).items() if n != default}
    return f"{default} prompts per dataset" + (" (" + ", ".join(f"{d} {n}" for d, n in own.items()) + ")" if own else "")


def render_sources(results: dict) -> list[str]:
    """One line per dataset and method that proposed from both the draft and prompt lookup (the
    hybrid): how many tokens each source proposed and what share of them the target accepted."""
    lines = []
    for row in results["results"]:
        sources = row.get("by_source")
        if not sources or not sources["lookup"]["proposed"]:
            continue
        parts = [
            f"{name} proposed {entry['proposed']} tokens, {entry['acceptance']:.0%} accepted" if entry["proposed"] else f"{name} proposed none"
            for name, entry in sources.items()
        ]
        lines.append(f"- {_group_label(*_group(row))}: {row['method']}: " + "; ".join(parts))
    return lines


def _hybrid_line(meta: dict) -> list[str]:
    """The prompt-lookup settings dflare-hybrid ran with, when it ran (older results may lack them)."""
    if not any(str(m).startswith("dflare-hybrid") for m in meta.get("methods", [])):
        return []
    own = (meta.get("draft_configs", {}).get("dflare") or {}).get("prompt_lookup")
    given = meta["settings"].get("lookup_ngram")
    longest = f"{given} (--lookup-ngram)" if given else f"{own['ngram']} (the draft's own)" if own and own["ngram"] else str(DEFAULT_LOOKUP_NGRAM)
    rest = f", shortest {own['min_ngram']}, lookup confidence {own['confidence']} (the draft's own)" if own else ""
    return [f"- dflare-hybrid prompt lookup: longest n-gram {longest}{rest}"]


def render_markdown(results: dict) -> str:
    """Full report: setup, results table, forward costs, HumanEval pass@1 and any mismatch."""
    meta = results["meta"]
    hw = meta["hardware"]
    settings = meta["settings"]
    threshold = settings["confidence_threshold"]
    if threshold is None:
        defaults = ", ".join(f"{k} {v['confidence_threshold']}" for k, v in meta.get("draft_configs", {}).items())
        threshold = f"the drafts' own ({defaults})" if defaults else "the drafts' own"
    features = f", {' '.join(hw['cpu_features']) or 'no AVX2'}" if hw.get("cpu_features") is not None else ""
    machine = hw.get("gpu") or f"{hw.get('processor')} ({hw.get('torch_threads')} torch threads{features})"
    precision = meta.get("draft_precision") or {}
    lines = [
        "## dflare bench",
        "",
        f"- Date: {meta['date']}; device `{meta['device']}` {meta['dtype']}; {machine}",
        f"- torch {hw.get('torch')}, transformers {hw.get('transformers')}",
        f"- Target: `{meta['target']}`; drafts: "
        + ", ".join(f"{k} `{v}`" for k, v in meta["drafts"].items())
        + (" (**random, untrained**)" if meta.get("random_drafts") else "")
        + ("; drafts run as " + ", ".join(f"{k} {v}" for k, v in precision.items()) if precision else ""),
        f"- {_decoding_line(settings)}, block size {settings['block_size']}, confidence threshold {threshold}, "
        f"{_prompt_counts(settings)}, max {settings['max_new_tokens']} new tokens, "
        f"median of {settings['repeats']} timed repeat(s) per prompt after one untimed warm-up run of every method, "
        "methods interleaved per prompt; the Prompts × repeats column counts what stands behind each row",
        *([f"- Prompt format: {settings['prompt_format']}"] if settings.get("prompt_format") else []),
        *_hybrid_line(meta),
        f"- Command: `{meta['command']}`",
        *(
            ["- Prompts: " + "; ".join(f"{name}: {text}" for name, text in meta["prompt_splits"].items())]
            if meta.get("prompt_splits")
            else []
        ),
        "",
        render_table(results),
        "",
        *render_headline(results),
        *render_categories(results),
        *(["", "Where the proposals came from (a cycle's drafts come first, the lookup's continuation after them):", *sources]
          if (sources := render_sources(results)) else []),
        "",
        "Free-draft ceiling = τ · t1 / t_verify(mean verified length): the speedup a draft costing nothing "
        "would give at the measured τ, from the target forward costs below (t1: plain decoding's step; t_verify: "
        "the kernels the method verifies on, small-row ones for DFlare drafts: per layer and row count the kernel timed "
        "fastest on this machine, W @ x.T for dflare-hybrid-matmul, oneDNN's linear on packed weights for dflare-hybrid-packed); % of ceiling = speedup vs plain / ceiling; draft share = draft time / measured cycle time.",
        "",
        render_costs(results),
    ]
    if results.get("humaneval_pass1"):
        lines += ["", "| HumanEval pass@1 | passed / total |", "|---|---|"]
        for method, score in results["humaneval_pass1"].items():
            lines.append(f"| {method}: {score['pass@1']:.3f} | {score['passed']} / {score['total']} |")
    if results.get("mismatches"):
        lines += ["", f"**GREEDY MISMATCH: {len(results['mismatches'])} output(s) differ from plain decoding.**", ""]
        for m in results["mismatches"]:
            decoding = f" ({temperature_label(m['temperature'])})" if m.get("temperature") else ""
            lines.append(f"- {m['dataset']}{decoding} `{m['prompt_id']}` {m['method']}: {m['reason']} at new token {m['first_difference']}")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(results: dict, path: str | Path) -> Path:
    """Grouped bars: speedup over plain decoding per dataset and method."""
    plt = _pyplot()
    rows = results["results"]
    groups = list(dict.fromkeys(_group(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(methods) / 3), 4))
    for i, method in enumerate(methods):
        values = [next((r["speedup"] for r in rows if _group(r) == g and r["method"] == method), 0.0) for g in groups]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), [_group_label(*g) for g in groups])
    ax.set_ylabel("speedup vs plain generate")
    ax.set_title(f"dflare bench ({results['meta']['device']}, {results['meta']['dtype']})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_acceptance(results: dict, path: str | Path) -> Path:
    """Per dataset: histogram of accepted drafts per cycle (top) and per-position acceptance (bottom)."""
    plt = _pyplot()
    rows = [r for r in results["results"] if r.get("histogram")]
    groups = list(dict.fromkeys(_group(r) for r in results["results"]))
    fig, axes = plt.subplots(2, max(len(groups), 1), figsize=(4.5 * max(len(groups), 1), 6), squeeze=False)
    for column, group in enumerate(groups):
        top, bottom = axes[0][column], axes[1][column]
        for row in (r for r in rows if _group(r) == group):
            total = sum(row["histogram"]) or 1
            top.plot(range(len(row["histogram"])), [c / total for c in row["histogram"]], marker="o", label=f"{row['method']} τ={row['tau']:.2f}")
            curve = row["position_acceptance"]
            bottom.plot([k + 1 for k, v in enumerate(curve) if v is not None], [v for v in curve if v is not None], marker=".", label=row["method"])
        top.set_title(_group_label(*group))
        top.set_xlabel("drafts accepted per cycle")
        top.set_ylabel("fraction of cycles")
        bottom.set_xlabel("block position")
        bottom.set_ylabel("acceptance rate")
        bottom.set_ylim(0, 1.05)
        top.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = [
    "DEFAULT_LOOKUP_NGRAM", "plot_acceptance", "plot_speedup", "render_categories", "render_costs", "render_markdown",
    "render_sources", "render_table", "above_ceiling", "temperature_label",
]  # fmt: skip
