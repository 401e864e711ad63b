"""The learning curve: held-out acceptance against CPU-hours, from the ``curve`` of training summaries.

``python -m modeling_dflare.training.curve OUT_DIR LABEL=SUMMARY_JSON [LABEL=SUMMARY_JSON ...]``
writes ``OUT_DIR/training-curve.png`` and prints a markdown table (one row per evaluation) that
``docs/training-curve.md`` embeds. Each summary's points are placed at their cumulative CPU-hours,
so a warm-started run continues the line of the run it started from.
"""

import json
import sys
from pathlib import Path


def load_curves(specs: list[str]) -> dict[str, list[dict]]:
    """``{label: points}`` from ``LABEL=path/to/training_summary.json`` specs."""
    curves = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"{spec!r}: expected LABEL=path/to/training_summary.json")
        summary = json.loads(Path(path).read_text())
        points = list(summary.get("curve") or [])
        final = summary.get("consistency") or {}
        if final and points:
            points[-1] = {**points[-1], "generate_tau": final.get("generate_tau")}
        curves[label] = points
    return curves


def markdown_table(curves: dict[str, list[dict]]) -> str:
    rows = ["| run | step | CPU-hours | held-out acc@1 | implied τ (random anchors) | walked τ | τ in generate |", "|---|---|---|---|---|---|---|"]
    for label, points in curves.items():
        for point in points:
            acc = point.get("acc") or [float("nan")]
            generate = point.get("generate_tau")
            rows.append(
                f"| {label} | {point['step']} | {point['cpu_hours']:.2f} | {acc[0]:.3f} | {point['tau']:.3f} | "
                f"{point.get('walk_tau') or float('nan'):.3f} | {generate if generate is not None else '–'} |"
            )
    return "\n".join(rows) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    # tall enough for the legend beside the axes: one line per run and three for the measures
    figure, axis = plt.subplots(figsize=(9.5, max(4.5, 0.19 * (len(curves) + 3) + 0.6)))
    handles = []
    if len(curves) <= 20:  # qualitative colours while they last, then a continuous map (no two runs alike)
        palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
        colors = [palette(i) for i in range(len(curves))]
    else:
        colors = [plt.get_cmap("turbo")(i / (len(curves) - 1)) for i in range(len(curves))]
    for color, (label, points) in zip(colors, curves.items()):
        hours = [p["cpu_hours"] for p in points]
        axis.plot(hours, [p["tau"] for p in points], "o--", color=color, alpha=0.6, markersize=3)
        axis.plot(hours, [p.get("walk_tau") or float("nan") for p in points], "o-", color=color, markersize=4)
        measured = [(p["cpu_hours"], p["generate_tau"]) for p in points if p.get("generate_tau")]
        if measured:
            axis.plot(*zip(*measured), "*", color=color, markeredgecolor="k", markersize=12)
        handles.append(Line2D([], [], color=color, marker="o", label=label))
    # one colour per run; the line style says which measure
    handles += [
        Line2D([], [], color="grey", linestyle="--", marker="o", markersize=3, label="implied τ (random anchors)"),
        Line2D([], [], color="grey", linestyle="-", marker="o", markersize=4, label="walked τ (≈ generate)"),
        Line2D([], [], color="grey", linestyle="", marker="*", markeredgecolor="k", markersize=12, label="τ measured in generate"),
    ]
    axis.set_xlabel("cumulative CPU-hours (2-core machine, threads x wall time)")
    axis.set_ylabel("acceptance length τ (held-out, no cut)")
    axis.grid(alpha=0.3)
    axis.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out, specs = Path(argv[0]), argv[1:]
    curves = load_curves(specs)
    print(markdown_table(curves))
    print(f"wrote {plot(curves, out / 'training-curve.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
