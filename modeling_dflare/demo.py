"""``dflare demo``: the embedded SmolLM2 target with the shipped DFlare draft, against plain decoding.

For each prompt it runs plain greedy ``generate`` and ``generate(assistant_model=draft)`` in the
same process, checks that the texts are identical, and prints the text, the acceptance length and
the wall-clock speedup measured in that run. The speedup is the median over ``--repeats`` timed
pairs per prompt, run interleaved (plain first in one pair, DFlare first in the next) after a
warm-up, so a slow spell of a shared machine lands on both sides alike.
"""

import logging
import statistics
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SHIPPED_DRAFT = Path(__file__).resolve().parent.parent / "drafts" / "smollm2-dflare"
#: Timed pairs per prompt: with 5 interleaved pairs two runs of `make demo` on one 2-core machine
#: agree far better than with one timed run per prompt, which swung by a quarter between runs.
DEFAULT_REPEATS = 5
DEMO_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What are three tips for staying productive when working from home?",
    "A shop sells pencils at 3 for $1. How much do 12 pencils cost? Explain step by step.",
]


def add_arguments(parser) -> None:
    parser.add_argument("--draft", default=str(SHIPPED_DRAFT), help="draft folder (default: the shipped SmolLM2 DFlare draft)")
    parser.add_argument("--target", default=None, help="target folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: three built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=None, help="override the draft's block size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    from .chat_templates import add_prompt_format_arguments

    add_prompt_format_arguments(parser)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help="timed plain/DFlare pairs per prompt, interleaved; the speedup shown is their median")


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def timed_pairs(plain_fn, dflare_fn, repeats: int) -> tuple[list[float], list[float], tuple, bool]:
    """Time ``repeats`` plain/DFlare pairs, alternating which side runs first. Returns (plain
    seconds, DFlare seconds, (plain output, DFlare output, DFlare stats) of the last pair, whether
    the two outputs were identical in every pair). ``dflare_fn`` returns (output, stats)."""
    plain_s, dflare_s, last, identical = [], [], None, True
    for repeat in range(repeats):
        order = ("plain", "dflare") if repeat % 2 == 0 else ("dflare", "plain")
        results = {side: _timed(plain_fn if side == "plain" else dflare_fn) for side in order}
        plain_s.append(results["plain"][1])
        dflare_s.append(results["dflare"][1])
        last = (results["plain"][0], results["dflare"][0][0], results["dflare"][0][1])
        identical &= torch.equal(last[0], last[1])
    return plain_s, dflare_s, last, identical


def run(args) -> int:
    from transformers import AutoModel, GenerationConfig

    from . import DFlareModel  # noqa: F401  (registers the generate() hook)
    from .cpu_kernels_dflare import fast_draft_dtype
    from .targets import load_target, load_tokenizer

    if args.repeats < 1:
        raise SystemExit(f"dflare demo: --repeats {args.repeats}: expected at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    draft_dir = Path(args.draft)
    if not (draft_dir / "config.json").exists():
        raise SystemExit(f"no draft at {draft_dir}: train one with `dflare train` or pass --draft DIR")
    from .chat_templates import resolve_prompt_format
    from .target_info import check_prompt_format

    from .bench_plan import draft_fit_problems
    from .target_info import target_info

    prompt_format = resolve_prompt_format(args, draft_dir)
    info = target_info(args.target)
    check_prompt_format(args.target, prompt_format, info)  # a target without a chat template fails here, before it loads
    problems = draft_fit_problems(draft_dir, info)  # so does a draft of another target (the shipped one beside yours)
    if problems:
        raise ValueError(f"the draft {draft_dir.name} does not fit target {info.label} ({', '.join(problems)}): "
                         "pass --draft with a draft trained for this target")
    print(f"loading target ({args.target or 'embedded SmolLM2-135M-Instruct'}) and draft ({draft_dir}) ...", flush=True)
    target, tokenizer = load_target(args.target), load_tokenizer(args.target, prompt_format)
    # the draft only proposes: it runs in its fastest dtype here, the target stays fp32
    draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True, dtype=fast_draft_dtype()).eval()
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    if args.block_size:
        config.dflare_block_size = args.block_size

    def generate(ids, **kwargs):
        with torch.inference_mode():
            return target.generate(ids, generation_config=config, **kwargs)

    def speculative(ids):
        out = generate(ids, assistant_model=draft)
        return out, draft.dflare_stats

    prompts = args.prompt or DEMO_PROMPTS
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        for p in prompts
    ]
    generate(encoded[0][:, :8], assistant_model=draft)  # warm-up: first calls pay one-off costs
    generate(encoded[0][:, :8])
    totals = {"plain": 0.0, "dflare": 0.0, "tokens": 0, "accepted": 0, "cycles": 0}
    identical = True
    for prompt, ids in zip(prompts, encoded):
        plain_s, dflare_s, (plain, ours, stats), same = timed_pairs(lambda: generate(ids), lambda: speculative(ids), args.repeats)
        identical &= same
        new = plain.shape[1] - ids.shape[1]
        ratios = [p / d for p, d in zip(plain_s, dflare_s)]
        totals["plain"] += statistics.median(plain_s)
        totals["dflare"] += statistics.median(dflare_s)
        totals["tokens"] += new
        totals["accepted"] += sum(stats.accepted)
        totals["cycles"] += stats.cycles
        print("\n" + "=" * 80)
        print(f"PROMPT: {prompt}\n")
        print(tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True))
        print("-" * 80)
        print(
            f"{new} tokens | plain {new / statistics.median(plain_s):.1f} tok/s | DFlare {new / statistics.median(dflare_s):.1f} tok/s | "
            f"speedup {statistics.median(ratios):.2f}x (median of {len(ratios)} timed pairs, {min(ratios):.2f}-{max(ratios):.2f}) | "
            f"acceptance length {stats.acceptance_length:.2f} | identical to plain: {'yes' if same else 'NO'}"
        )
    tau = (totals["accepted"] + totals["cycles"]) / max(1, totals["cycles"])
    print("\n" + "=" * 80)
    print(
        f"OVERALL: {totals['tokens']} tokens | plain {totals['tokens'] / totals['plain']:.1f} tok/s | "
        f"DFlare {totals['tokens'] / totals['dflare']:.1f} tok/s | speedup {totals['plain'] / totals['dflare']:.2f}x | "
        f"acceptance length {tau:.2f} | outputs identical: {'yes' if identical else 'NO'}"
    )
    print(
        f"(timing: median of {args.repeats} interleaved plain/DFlare pairs per prompt after a warm-up; "
        f"draft ran as {draft.dflare_stats.draft_precision}; {torch.get_num_threads()} threads)"
    )
    return 0 if identical else 1
