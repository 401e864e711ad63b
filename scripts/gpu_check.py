#!/usr/bin/env python
"""Prove it on a GPU: CUDA correctness, the speedup-vs-acceptance curve at real model sizes, and
training throughput, in one prepared run (under 8 minutes on one H100/H200).

    python scripts/gpu_check.py --out docs/gpu-run            # on the GPU machine
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gpu-check   # same code paths, tiny shapes

Writes ``gpu_check.json``, ``gpu_check.md`` and ``speedup_vs_tau.png`` into ``--out``.

1. **Correctness**: greedy equality of ``generate(assistant_model=draft)`` with plain ``generate`` on
   tiny random targets of four architectures, fp32 and bf16, our generator and (where this
   transformers has it) the stock ``speculation_type="dflash"`` path, random and oracle drafts, and
   on the full-attention targets the fixed-shape verify (``dflare_static_verify=True``; compiled on a
   GPU, eager on a CPU).
   fp32 must be identical; in bf16 a verify over many tokens and a one-token step round
   differently, so a near-tie may flip a token: bf16 rows report equality instead of failing.
2. **Speedup vs τ**: random-weight bf16 targets of real geometries (Qwen3-1.7B, -4B, -8B shapes)
   and a 5-layer draft of the papers' geometry whose output is steered to accept exactly ``τ - 1``
   drafts per cycle (the real draft forward still runs, so its cost is real). For τ = 1..10, block
   16 and 8, our generator and the stock one: the wall-clock speedup over plain ``generate`` and the
   per-cycle draft / verify / overhead split. This is the curve "at τ = x, expect y" on this GPU.
3. **The compiled pair**: ``dflare_static_verify=True`` (the fixed-shape verify on a static cache,
   ``torch.compile``'d: CUDA graphs) against transformers' compiled static-cache plain decoding, on
   one shape (qwen3-1.7b unless ``--shapes``), block 16, the same forced τ values; each speedup is
   over the compiled baseline. Its compiles take minutes: run it as its own call
   (``--skip correctness curve training``) where one call has a time limit.
4. **Training throughput**: tokens/s and peak memory of draft training steps (online target
   features, anchors, block mask, bf16) for a Qwen3-4B-shape random target and a 5-layer draft.

Weights are random: cost does not depend on them. Nothing is downloaded.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

#: Real target geometries (Qwen3 model cards); the CPU/quick mode shrinks them.
SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}
QUICK_SHAPES = {
    "tiny-a": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "tiny-b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}
VOCAB, QUICK_VOCAB = 151936, 512


def stock_dflash_available() -> bool:
    """Whether this transformers has the stock DFlash candidate generator (5.23 has it)."""
    try:
        from transformers.generation import candidate_generator

        return hasattr(candidate_generator, "DFlashTokenCandidateGenerator")
    except ImportError:
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------


def correctness(device: torch.device, quick: bool) -> list[dict]:
    from modeling_dflare.testing import (
        ARCHITECTURES, STATIC_ARCHITECTURES, greedy, make_draft, make_oracle, make_target, path_kwargs, random_prompt, static_config,
    )

    paths = ["custom"] + (["stock"] if stock_dflash_available() else []) + ["static"]
    rows = []
    for arch in ARCHITECTURES if not quick else ("llama", "qwen3"):
        for dtype in (torch.float32, torch.bfloat16):
            target = make_target(arch).to(device, dtype)
            for seed in range(1 if quick else 3):
                prompt = random_prompt(6 + seed, seed=seed).to(device)
                expected = greedy(target, prompt, max_new_tokens=24)
                for path in paths:
                    if path == "static" and arch not in STATIC_ARCHITECTURES:
                        continue  # full-attention targets only (a sliding-window cache is not rolled back)
                    for block in (4, 16):
                        random_draft = make_draft(target, block_size=block).to(device, dtype)
                        # the fixed-shape verify: compiled on a GPU, eager on a CPU (compiling each of these
                        # small targets there would take longer than the rest of the check)
                        kwargs = ({"generation_config": static_config(target, compiled=device.type == "cuda")} if path == "static"
                                  else path_kwargs(path))
                        got_random = greedy(target, prompt, max_new_tokens=24, assistant_model=random_draft, **kwargs)
                        oracle, _ = make_oracle(target, prompt, block_size=block, corruption=0.2, seed=seed)
                        oracle = oracle.to(device, dtype)
                        got_oracle = greedy(target, prompt, max_new_tokens=24, assistant_model=oracle, **kwargs)
                        stats = getattr(oracle, "dflare_stats", None)
                        rows.append(
                            {
                                "arch": arch,
                                "dtype": str(dtype).replace("torch.", ""),
                                "path": path,
                                "block": block,
                                "seed": seed,
                                "random_equal": torch.equal(got_random, expected),
                                "oracle_equal": torch.equal(got_oracle, expected),
                                "oracle_tau": round(stats.acceptance_length, 3) if (stats and path != "stock") else None,
                            }
                        )
    return rows


# ----------------------------------------------------------------------------------------------
# 2. speedup vs tau
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CurvePoint:
    shape: str
    path: str
    block: int
    forced_tau: int
    measured_tau: float
    seconds: float
    plain_seconds: float
    speedup: float
    cycles: int
    draft_ms_per_cycle: float
    verify_ms_per_cycle: float
    overhead_ms_per_cycle: float
    identical: bool


def _target(shape: dict, vocab: int, device, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an fp32 copy of an 8B model would need 32 GB first
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(saved)
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def make_decisive(model, embedding_std: float = 4.0, seed: int = 0):
    """Give a random-weight target a wide argmax margin at every step.

    With random weights the logits are nearly flat (median top-1/top-2 gap about 0.1 at
    Qwen3-1.7B geometry), so in bf16 a verify over many tokens and a one-token step round
    differently and flip the argmax: speculative output then drifts from plain decoding (on the CPU
    in bf16 the first flip came after 14 tokens) and a steered draft, which proposes plain
    decoding's continuation, cannot hold its forced τ. Here the input embeddings dominate the
    residual stream and the head maps token ``t``'s embedding to a fixed successor, so the next token
    is a fixed function of the current one with a margin far above bf16 rounding. Shapes, kernels
    and so costs are unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        rows = torch.randn(embed.shape, generator=generator) * embedding_std
        embed.copy_(rows.to(embed.device, embed.dtype))
        successor = torch.randperm(embed.shape[0], generator=generator).to(embed.device)
        model.get_output_embeddings().weight.copy_(embed[successor])
    return model


#: curve path label of each bench method
PATH_LABELS = {"dflare": "ours", "dflare-stock": "stock", "dflare-static": "ours-static"}


def speed_curve(
    device: torch.device, quick: bool, new_tokens: int, on_point=None, deadline: float | None = None, names: list[str] | None = None,
    static: bool = False,
) -> list[CurvePoint]:
    """Points in order target, block, τ, path; ``on_point(point)`` after each (the caller saves as it
    goes), and no new target or τ is started after ``deadline`` (a ``time.perf_counter()`` value).

    ``static``: the compiled pair instead: ``dflare-static`` (the fixed-shape verify of
    ``dflare_static_verify=True``, compiled) against ``plain-static`` (transformers' compiled
    static-cache decoding), block 16 only (each shape is a compile of the whole target)."""
    from modeling_dflare.bench import Clock, Settings, generate_once
    from modeling_dflare.testing import OracleDraft, greedy, make_draft

    shapes, vocab = (QUICK_SHAPES, QUICK_VOCAB) if quick else (SHAPES, VOCAB)
    if names:
        shapes = {name: {**SHAPES, **QUICK_SHAPES}[name] for name in names}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    taus = (1, 2, 3) if quick else (1, 2, 3, 4, 5, 6, 8, 10)
    blocks = (4,) if quick else (16,) if static else (16, 8)
    methods = ["dflare-static"] if static else ["dflare"] + (["dflare-stock"] if stock_dflash_available() else [])
    baseline = "plain-static" if static else "plain"
    clock, points = Clock(device), []

    def late() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    for name, shape in shapes.items():
        if late():
            print(f"curve: deadline reached, {name} skipped", flush=True)
            break
        target = make_decisive(_target(shape, vocab, device, dtype))
        prompt = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
        reference = greedy(target, prompt, max_new_tokens=new_tokens + 16, min_new_tokens=new_tokens + 16)
        plain_runs = [generate_once(baseline, target, prompt, {}, Settings(new_tokens, 16, 0.0, 10), clock) for _ in range(2 + static)]
        plain = min(run.seconds for run in plain_runs[static:])  # the compiled baseline's first call compiles
        expected = plain_runs[0].tokens
        for block in blocks:
            draft = make_draft(target, block_size=block, cls=OracleDraft, num_hidden_layers=5).to(device, dtype)
            draft.prime(target, reference)
            warmed = set()
            for tau in (t for t in taus if t <= block):
                if late():
                    print(f"curve: deadline reached, {name} block {block} stops before tau {tau}", flush=True)
                    break
                draft.accept_first = tau
                for method in methods:
                    settings = Settings(new_tokens, block, 0.0, 10)
                    if method not in warmed:  # one warm-up per draft and path: kernels and caches are warm after it
                        generate_once(method, target, prompt, {"dflare": draft}, settings, clock)
                        warmed.add(method)
                    run = generate_once(method, target, prompt, {"dflare": draft}, settings, clock)
                    cycles = max(1, len(run.cycles))
                    verify = sum(run.target_seconds[1:])
                    overhead = run.seconds - run.target_seconds[0] - verify - run.draft_seconds if run.target_seconds else 0.0
                    point = CurvePoint(
                        shape=name,
                        path=PATH_LABELS[method],
                        block=block,
                        forced_tau=tau,
                        measured_tau=round((sum(a for _, a in run.cycles) + len(run.cycles)) / cycles, 3),
                        seconds=round(run.seconds, 4),
                        plain_seconds=round(plain, 4),
                        speedup=round(plain / run.seconds, 3),
                        cycles=len(run.cycles),
                        draft_ms_per_cycle=round(1000 * run.draft_seconds / cycles, 3),
                        verify_ms_per_cycle=round(1000 * verify / cycles, 3),
                        overhead_ms_per_cycle=round(1000 * overhead / cycles, 3),
                        identical=run.tokens == expected,
                    )
                    points.append(point)
                    if on_point is not None:
                        on_point(point)
            del draft
        del target, plain_runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points


# ----------------------------------------------------------------------------------------------
# 3. training throughput
# ----------------------------------------------------------------------------------------------


def training_throughput(device: torch.device, quick: bool) -> dict:
    from modeling_dflare.anchors import position_weights, sample_anchors
    from modeling_dflare.testing import make_draft
    from modeling_dflare.training import Sequence, TargetFeatures, block_loss

    shape_name = "tiny-b" if quick else "qwen3-4b"
    shape = (QUICK_SHAPES if quick else SHAPES)[shape_name]
    vocab = QUICK_VOCAB if quick else VOCAB
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    length, anchors_per_sequence, block = (96, 8, 8) if quick else (2048, 512, 16)
    target = _target(shape, vocab, device, dtype)
    draft = make_draft(target, block_size=block, num_hidden_layers=5).to(device)
    draft.train()
    features = TargetFeatures(target, precision="fp32" if device.type == "cpu" else "bf16")
    optimizer = torch.optim.AdamW(draft.parameters(), lr=6e-4)
    weights = position_weights(block, 7.0)
    head = target.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(2 + (2 if quick else 4)):
        sequence = Sequence(f"s{step}", torch.randint(0, vocab, (length,), generator=generator), length // 4)
        anchors = sample_anchors(sequence.response_start, length, anchors_per_sequence, generator)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            result = block_loss(draft, target.get_input_embeddings(), head, None, sequence, features(sequence, draft.config.target_layer_ids), anchors, weights, "data")
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    steady = times[2:]
    seconds = sum(steady) / len(steady)
    return {
        "target_shape": shape_name,
        "draft_layers": 5,
        "sequence_tokens": length,
        "anchors": anchors_per_sequence,
        "block_size": block,
        "seconds_per_sequence": round(seconds, 4),
        "tokens_per_second": round(length / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "note": "online target features (the target forward is inside the step), bf16 autocast on CUDA",
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def render_markdown(results: dict) -> str:
    """The report; a section that did not run or failed says so instead of a table."""
    meta = results["meta"]
    lines = [
        "# GPU check",
        "",
        f"- Device: {meta['device_name']} ({meta['device']}); torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['date']}; {meta['seconds']:.0f} s in all",
        f"- Command: `{meta['command']}`",
        f"- Stock `speculation_type=\"dflash\"` path available: {meta['stock_dflash']}",
        "",
        "## Correctness (greedy equality with plain generate)",
        "",
    ]
    rows = results["correctness"]
    if rows:
        lines += [
            "| dtype | path | cases | random draft identical | oracle draft identical | mean oracle τ (ours) |",
            "|---|---|---|---|---|---|",
        ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for path in dict.fromkeys(r["path"] for r in rows):
            chosen = [r for r in rows if r["dtype"] == dtype and r["path"] == path]
            taus = [r["oracle_tau"] for r in chosen if r["oracle_tau"]]
            mean_tau = f"{sum(taus) / len(taus):.2f}" if taus else "–"
            lines.append(
                f"| {dtype} | {path} | {len(chosen)} | {sum(r['random_equal'] for r in chosen)} | "
                f"{sum(r['oracle_equal'] for r in chosen)} | {mean_tau} |"
            )
    lines += [
        "" if rows else _missing(results, "correctness"),
        "fp32 must be identical in every case; bf16 verification is not bit-identical to bf16 one-token decoding "
        "(near-ties may flip), so bf16 rows are reported, not required.",
        "",
        "## Speedup over plain generate vs acceptance length",
        "",
    ]
    if results["curve"]:
        lines += [
            "| target | block | path | τ forced | τ measured | speedup | draft ms/cycle | verify ms/cycle | overhead ms/cycle | identical |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for p in results["curve"]:
        lines.append(
            f"| {p['shape']} | {p['block']} | {p['path']} | {p['forced_tau']} | {p['measured_tau']:.2f} | {p['speedup']:.2f}x | "
            f"{p['draft_ms_per_cycle']:.1f} | {p['verify_ms_per_cycle']:.1f} | {p['overhead_ms_per_cycle']:.1f} | {'yes' if p['identical'] else 'NO'} |"
        )
    if "curve" in results["errors"] or not results["curve"]:
        lines.append(_missing(results, "curve"))
    lines += [
        "", "## The compiled pair: fixed-shape verify vs compiled plain decoding", "",
        "`dflare_static_verify=True` (every cycle verifies the whole block on a static cache, through a `torch.compile`'d "
        "target: CUDA graphs on a GPU) against transformers' own compiled static-cache decoding (`cache_implementation=\"static\"`, "
        "the same compile config): the speedup column is over that compiled baseline, not over eager plain decoding. "
        "Target forwards are not timed one by one here, so the verify and overhead columns are 0.", "",
    ]
    static = results.get("static") or []
    if static:
        lines += [
            "| target | block | path | τ forced | τ measured | speedup vs compiled plain | draft ms/cycle | identical |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for p in static:
        lines.append(
            f"| {p['shape']} | {p['block']} | {p['path']} | {p['forced_tau']} | {p['measured_tau']:.2f} | {p['speedup']:.2f}x | "
            f"{p['draft_ms_per_cycle']:.1f} | {'yes' if p['identical'] else 'NO'} |"
        )
    if "static" in results["errors"] or not static:
        lines.append(_missing(results, "static"))
    lines += ["", "## Training throughput", ""]
    t = results["training"]
    if t:
        lines.append(
            f"{t['target_shape']} target, {t['draft_layers']}-layer draft, sequences of {t['sequence_tokens']} tokens with "
            f"{t['anchors']} anchors of block {t['block_size']}: {t['tokens_per_second']} tokens/s "
            f"({t['seconds_per_sequence']} s per sequence), peak memory {t['peak_memory_gib']} GiB. {t['note']}."
        )
    else:
        lines.append(_missing(results, "training"))
    return "\n".join(lines) + "\n"


def _missing(results: dict, name: str) -> str:
    error = results["errors"].get(name)
    if error is None:
        return "(not run)" if not results[name] else ""
    return f"**Failed** (the run went on without it):\n\n```\n{error.strip().splitlines()[-1]}\n```"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points_all = results["curve"] + (results.get("static") or [])
    shapes = list(dict.fromkeys(p["shape"] for p in points_all))
    figure, axes = plt.subplots(1, max(1, len(shapes)), figsize=(4.5 * max(1, len(shapes)), 3.8), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        for block in sorted({p["block"] for p in results["curve"] if p["shape"] == shape}, reverse=True):
            for generator in ("ours", "stock", "ours-static"):
                points = [p for p in points_all if p["shape"] == shape and p["block"] == block and p["path"] == generator]
                if points:
                    style = {"ours": "o-", "stock": "s--", "ours-static": "^-."}[generator]
                    axis.plot([p["measured_tau"] for p in points], [p["speedup"] for p in points], style, label=f"{generator}, block {block}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(shape)
        axis.set_xlabel("acceptance length τ")
        axis.set_ylabel("speedup over plain generate (static: over compiled plain)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{results['meta']['device_name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and fewer points (the CPU test mode)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per timed generate (default 128, quick 24)")
    parser.add_argument("--out", default="gpu-check", help="output folder")
    parser.add_argument("--skip", nargs="*", default=[], choices=("correctness", "curve", "static", "training"))
    parser.add_argument(
        "--shapes", nargs="*", default=None, choices=(*SHAPES, *QUICK_SHAPES),
        help="curve targets to run (default: the three Qwen3 shapes, or the tiny ones with --quick)",
    )
    parser.add_argument(
        "--curve-deadline", type=float, default=None, metavar="SECONDS",
        help="start no new curve point after this many seconds from the start (keeps a time-limited machine's time for the training section)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu --quick")
    import transformers

    import modeling_dflare  # noqa: F401  (registers the generate() hook)

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "stock_dflash": stock_dflash_available(),
        }
    }
    new_tokens = args.new_tokens or (24 if args.quick else 128)
    deadline = start + args.curve_deadline if args.curve_deadline is not None else None
    results.update(correctness=[], curve=[], static=[], training={}, errors={})

    def save() -> None:
        """Written after every section and curve point: a run cut off by the machine's limit keeps what it measured."""
        results["meta"]["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")

    def section(name: str, compute) -> None:
        if name in args.skip:
            return
        try:
            results[name] = compute()
        except Exception as error:  # one broken section must not lose the others' numbers
            results["errors"][name] = "".join(traceback.format_exception(error))[-4000:]
            print(f"{name}: FAILED\n{results['errors'][name]}", flush=True)
        save()
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)

    section("correctness", lambda: correctness(device, args.quick))
    def record(point: CurvePoint) -> None:
        results["curve"].append(dataclasses.asdict(point))
        save()

    def curve() -> list[dict]:
        speed_curve(device, args.quick, new_tokens, on_point=record, deadline=deadline, names=args.shapes)
        return results["curve"]  # filled point by point by record()

    def record_static(point: CurvePoint) -> None:
        results["static"].append(dataclasses.asdict(point))
        save()

    def static_curve() -> list[dict]:
        names = args.shapes or ([next(iter(QUICK_SHAPES))] if args.quick else ["qwen3-1.7b"])
        speed_curve(device, args.quick, new_tokens, on_point=record_static, deadline=deadline, names=names, static=True)
        return results["static"]

    section("curve", curve)
    section("static", static_curve)
    section("training", lambda: training_throughput(device, args.quick))
    (out / "gpu_check.md").write_text(render_markdown(results))
    if results["curve"] or results["static"]:
        plot(results, out / "speedup_vs_tau.png")
    fp32_failures = [r for r in results["correctness"] if r["dtype"] == "float32" and not (r["random_equal"] and r["oracle_equal"])]
    # the targets are decisive (make_decisive), so speculative output must equal plain decoding on any device
    curve_failures = [p for p in results["curve"] + results["static"] if not p["identical"]]
    print(f"wrote {out}; {results['meta']['seconds']:.0f} s; fp32 mismatches: {len(fp32_failures)}; errors: {sorted(results['errors'])}", flush=True)
    if curve_failures:
        print(f"curve: {len(curve_failures)} points differ from plain generate", flush=True)
    return 1 if fp32_failures or curve_failures or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
