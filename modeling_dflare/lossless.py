"""``dflare check-lossless``: DFlare's output is the target's, checked on thousands of random cases.

Two properties, each over tiny random targets of every architecture in :mod:`modeling_dflare.testing`
(Llama, Qwen3, Mistral, Gemma3 with a short sliding window):

* **greedy**: ``generate(assistant_model=draft)`` returns exactly plain greedy ``generate``'s tokens.
  A case draws the target (architecture, seed, depth), the draft (random, or the oracle of
  :mod:`modeling_dflare.testing` with a random corruption rate, so blocks are partly or fully
  accepted; fusion, block size, depth, layer count, dtype, int8 copy, reduced vocabulary, confidence
  cut, prompt-lookup hybrid), the generator (ours or transformers' stock DFlash one), the verify
  kernels, the prompt (length, left padding) and the generation settings (length, eos inside the
  continuation, repetition penalty, no-repeat n-grams, a stopping criterion).
* **sampling**: sampled continuations follow the target's exact distribution. One sampled
  continuation proves nothing, so sampling cases are pooled: each draws one of the fixed
  configurations of :data:`SAMPLING_CONFIGS` (target, prompt, temperature, top-k; 8-token vocabulary,
  so the exact joint of the first :data:`~modeling_dflare.testing.NEW_TOKENS` tokens is computed by
  enumeration) and random drafting settings (draft, generator, block size, proposal mode, dtype,
  reduced vocabulary, cut, hybrid), and samples a few continuations. The continuations of each
  configuration, and of each configuration and proposal mode, are then tested together against the
  exact joint (chi-square over every pair of consecutive tokens, drafted pairs included).

Every case is a function of the run's seed, its kind and its index: the seed is printed first, and
a failing greedy case prints the line that replays it alone (``--seed S --replay greedy:I``). A
sampling case replays with enough continuations of its own to be tested alone.

The same case generators drive ``tests/test_fuzz.py`` (hypothesis draws through :class:`Draw`), whose
fixed derandomised subset runs in ``make test``. See docs/testing.md.
"""

import dataclasses
import logging
import random
import time

import torch

GREEDY_CASES = 10_000
SAMPLING_CASES = 1_000
#: Continuations each sampling case draws (all with one drafting setup).
CONTINUATIONS_PER_CASE = 4
#: Continuations a replayed sampling case draws, so that it can be tested alone.
REPLAY_CONTINUATIONS = 600
#: A pooled chi-square test fails below this p-value. A run makes about a dozen tests, each the
#: smallest of 3 pair p-values: a correct implementation fails one by chance about once in 2,500 runs.
P_FAIL = 1e-5
#: Pools smaller than this are reported but not tested (too few samples for the 64-cell pairs).
MIN_POOL = 200

#: The fixed sampling configurations (8-token vocabulary): their exact joints are computed once and
#: every sampling case adds its continuations to one of them.
SAMPLING_CONFIGS = (
    dict(arch="llama", target_seed=11, prompt=[1, 5, 2, 7], temperature=1.0, top_k=0),
    dict(arch="qwen3", target_seed=12, prompt=[3, 3, 6], temperature=0.7, top_k=0),
    dict(arch="mistral", target_seed=13, prompt=[0, 4, 1, 4, 2], temperature=1.5, top_k=4),
    dict(arch="gemma3", target_seed=14, prompt=[6, 2], temperature=1.0, top_k=4),
)


# ----------------------------------------------------------------------------------------------
# Where cases take their random choices from
# ----------------------------------------------------------------------------------------------


class Draw:
    """The random choices a case generator makes: a seeded :class:`random.Random` in the command
    (:class:`RandomDraw`), hypothesis in the tests (which then shrinks a failing case)."""

    def choice(self, options):
        raise NotImplementedError

    def integer(self, low: int, high: int) -> int:
        raise NotImplementedError

    def integers(self, low: int, high: int, min_size: int, max_size: int) -> list[int]:
        raise NotImplementedError


class RandomDraw(Draw):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def choice(self, options):
        return self.rng.choice(list(options))

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def integers(self, low: int, high: int, min_size: int, max_size: int) -> list[int]:
        return [self.rng.randint(low, high) for _ in range(self.rng.randint(min_size, max_size))]


def case_draw(kind: str, seed: int, index: int) -> RandomDraw:
    """The draws of case ``index`` of ``kind`` in a run with ``seed``: the same on every machine."""
    return RandomDraw(random.Random(f"{kind}:{seed}:{index}"))


# ----------------------------------------------------------------------------------------------
# Greedy: identical tokens
# ----------------------------------------------------------------------------------------------


def greedy_case(draw: Draw) -> dict:
    """A random greedy case (see the module docstring)."""
    from .testing import ARCHITECTURES

    layers = draw.integer(2, 4)
    case = dict(
        arch=draw.choice(ARCHITECTURES),
        target_seed=draw.integer(0, 10_000),
        target_layers=layers,
        fusion=draw.choice(["layerwise", "shared"]),
        block_size=draw.choice([2, 3, 4, 7, 16]),
        draft_layers=draw.integer(1, 2),
        num_target_layers=draw.integer(1, layers),
        oracle=draw.choice([True, True, False]),
        corruption=draw.choice([0.0, 0.1, 0.3, 0.7]),
        path=draw.choice(["custom", "stock"]),
        prompt=draw.integers(0, 99, 1, 20),
        left_pad=draw.choice([0, 0, 3]),
        max_new_tokens=draw.integer(1, 30) if draw.choice([True, False]) else draw.choice([17, 24, 30]),
        eos_index=draw.choice([None, None, "index"]),
        stop_index=draw.choice([None, None, "index"]),
        repetition_penalty=draw.choice([None, None, 1.5]),
        no_repeat_ngram_size=draw.choice([None, None, 3]),
        draft_dtype=draw.choice(["float32", "float32", "bfloat16"]),
        small_row_kernels=draw.choice([None, None, False, "packed", "matmul", "rows"]),
    )
    case["eos_index"] = draw.integer(0, 29) if case["eos_index"] else None
    case["stop_index"] = draw.integer(1, 29) if case["stop_index"] else None
    if case["path"] == "custom":
        case["confidence_threshold"] = draw.choice([0.0, 0.0, 0.2])
        case["draft_vocab_size"] = draw.choice([None, None, 50])
        case["prompt_lookup_ngram"] = draw.choice([0, 0, 3])
        case["prompt_lookup_min_ngram"] = draw.choice([1, 2])
        case["prompt_lookup_confidence"] = draw.choice([0.3, 0.9])
        case["int8_draft"] = draw.choice([None, None, False, True]) if case["draft_dtype"] == "float32" else None
    return case


@dataclasses.dataclass
class GreedyResult:
    new_tokens: int
    target_forwards: int

    @property
    def accepted(self) -> bool:
        """Whether drafts were accepted: every target forward yields one token unless they were."""
        return self.target_forwards < self.new_tokens


def _draft_kwargs(case: dict) -> dict:
    return dict(
        fusion=case["fusion"],
        block_size=case["block_size"],
        confidence_threshold=case.get("confidence_threshold", 0.0),
        draft_vocab_size=case.get("draft_vocab_size"),
        prompt_lookup_ngram=case.get("prompt_lookup_ngram", 0),
        prompt_lookup_min_ngram=case.get("prompt_lookup_min_ngram", 2),
        prompt_lookup_confidence=case.get("prompt_lookup_confidence", 0.3),
    )


def run_greedy_case(case: dict) -> GreedyResult:
    """Run one greedy case; ``AssertionError`` (with both outputs) where DFlare's differs from plain."""
    from transformers import StoppingCriteriaList

    from .testing import StopOnToken, VerifyCounter, greedy, make_draft, make_oracle, make_target

    overrides = dict(num_hidden_layers=case["target_layers"])
    if case["arch"] == "gemma3":  # alternate sliding (window 8) and full attention layers
        overrides["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(case["target_layers"])]
    target = make_target(case["arch"], seed=case["target_seed"], **overrides)
    prompt = torch.tensor([case["prompt"]])
    mask = None
    if case["left_pad"]:
        pad = case["left_pad"]
        prompt = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt], dim=-1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, prompt.shape[1] - pad, dtype=torch.long)], dim=-1)
        target.generation_config.pad_token_id = 0

    draft_kwargs = dict(_draft_kwargs(case), num_hidden_layers=case["draft_layers"], num_target_layers=case["num_target_layers"])
    if case["oracle"]:
        offset = case["left_pad"] if case["path"] == "stock" else 0
        draft, reference = make_oracle(
            target, prompt, corruption=case["corruption"], attention_mask=mask, position_offset=offset, extra_tokens=48, **draft_kwargs
        )
    else:
        draft = make_draft(target, **draft_kwargs)
        reference = greedy(target, prompt, attention_mask=mask, max_new_tokens=30)
    continuation = reference[0, prompt.shape[1] :].tolist()
    draft = draft.to(getattr(torch, case["draft_dtype"]))

    kwargs = dict(max_new_tokens=case["max_new_tokens"], attention_mask=mask)
    if case["eos_index"] is not None and case["eos_index"] < len(continuation):
        eos = continuation[case["eos_index"]]
        target.generation_config.eos_token_id = eos
        if target.generation_config.pad_token_id is None:
            target.generation_config.pad_token_id = eos
    if case["stop_index"] is not None and case["stop_index"] < len(continuation):
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnToken(continuation[case["stop_index"]])])
    for key in ("repetition_penalty", "no_repeat_ngram_size"):
        if case[key] is not None:
            kwargs[key] = case[key]

    expected = greedy(target, prompt, **kwargs)
    if case["path"] == "stock":
        kwargs["speculation_type"] = "dflash"
    # the case's own target: its generation config may carry the knobs
    if case.get("int8_draft") is not None:
        target.generation_config.dflare_int8_draft = case["int8_draft"]
    if case.get("small_row_kernels") is not None:
        kernels = case["small_row_kernels"]
        if kernels == "rows":
            from .cpu_kernels_dflare import rows_kernel

            kernels = "rows" if rows_kernel() is not None else "auto"  # no compiler here: the timed choice
        target.generation_config.dflare_small_row_kernels = kernels
    with VerifyCounter(target) as counter:
        got = greedy(target, prompt, assistant_model=draft, **kwargs)
    if got.tolist() != expected.tolist():
        raise AssertionError(f"DFlare greedy output differs from plain greedy: got {got[0].tolist()}, plain {expected[0].tolist()}")
    return GreedyResult(new_tokens=got.shape[1] - prompt.shape[1], target_forwards=counter.calls)


# ----------------------------------------------------------------------------------------------
# Sampling: the target's exact distribution
# ----------------------------------------------------------------------------------------------


def _drafting_settings(draw: Draw, case: dict) -> dict:
    """The drafting half of a sampling case (nothing here may change the target's distribution)."""
    case.update(
        fusion=draw.choice(["layerwise", "shared"]),
        block_size=draw.choice([2, 3, 4]),
        draft=draw.choice(["random", "primed", "primed"]),
        path=draw.choice(["custom", "custom", "stock"]),
        draft_dtype=draw.choice(["float32", "bfloat16"]),
        sample_seed=draw.integer(0, 2**31 - 1),  # pooled continuations are independent samples
    )
    if case["path"] == "custom":
        case["proposal"] = draw.choice(["sample", "argmax"])
        case["draft_vocab_size"] = draw.choice([None, None, 5])
        case["confidence_threshold"] = draw.choice([0.0, 0.0, 0.1])
        case["prompt_lookup_ngram"] = draw.choice([0, 0, 2])
        case["prompt_lookup_min_ngram"] = draw.choice([1, 2])
    return case


def sampling_case(draw: Draw) -> dict:
    """A sampling case with its own random target, prompt and warpers (tested alone: the tests)."""
    from .testing import ARCHITECTURES, SAMPLING_VOCAB

    case = dict(
        arch=draw.choice(ARCHITECTURES),
        target_seed=draw.integer(0, 10_000),
        temperature=draw.choice([0.7, 1.0, 1.5]),
        top_k=draw.choice([0, 0, 4]),
        prompt=draw.integers(0, SAMPLING_VOCAB - 1, 2, 6),
    )
    return _drafting_settings(draw, case)


def pooled_sampling_case(draw: Draw) -> dict:
    """A sampling case on one of the fixed :data:`SAMPLING_CONFIGS` (pooled with the others on it)."""
    config = draw.integer(0, len(SAMPLING_CONFIGS) - 1)
    return _drafting_settings(draw, dict(SAMPLING_CONFIGS[config], config=config))


def proposal_group(case: dict) -> str:
    """The pool a sampling case joins beside its configuration's: the generator and proposal mode."""
    return "stock" if case["path"] == "stock" else f"custom/{case['proposal']}"


def sampling_target(case: dict):
    """The 8-token target of a sampling case, with no eos (fixed-length continuations)."""
    from .testing import SAMPLING_VOCAB, make_target

    overrides = dict(vocab_size=SAMPLING_VOCAB, num_hidden_layers=2, initializer_range=0.5)
    if case["arch"] == "gemma3":
        overrides["layer_types"] = ["sliding_attention", "full_attention"]
    target = make_target(case["arch"], seed=case["target_seed"], **overrides)
    target.generation_config.eos_token_id = None
    return target


def exact_joint_of(case: dict, target) -> torch.Tensor:
    """The exact distribution of the first ``NEW_TOKENS`` tokens of ``case``'s configuration."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from .testing import NEW_TOKENS, exact_joint

    warpers = [TemperatureLogitsWarper(case["temperature"])] + ([TopKLogitsWarper(case["top_k"])] if case["top_k"] else [])
    return exact_joint(target, torch.tensor([case["prompt"]]), LogitsProcessorList(warpers), NEW_TOKENS)


def sample_case(case: dict, target, n: int) -> tuple[torch.LongTensor, int]:
    """``n`` continuations of ``case``'s prompt sampled with its drafting setup on ``target``, and
    the drafts accepted (our generator only)."""
    from .testing import NEW_TOKENS, make_draft, make_oracle, sample_continuations

    prompt = torch.tensor([case["prompt"]])
    draft_kwargs = _draft_kwargs(case)
    if case["draft"] == "primed":  # the real generator on the target's own hidden states: drafts get accepted
        draft, _ = make_oracle(target, prompt, **draft_kwargs)
    else:
        draft = make_draft(target, **draft_kwargs)
    draft = draft.to(getattr(torch, case["draft_dtype"]))
    kwargs = dict(assistant_model=draft, temperature=case["temperature"], top_k=case["top_k"])
    if case["path"] == "stock":
        kwargs["speculation_type"] = "dflash"
    # the knob rides on the target's generation config (shared by the cases of a pool: restored after)
    target.generation_config.dflare_sampling_proposal = case.get("proposal")
    try:
        samples, accepted, _ = sample_continuations(target, prompt, n, case["sample_seed"], NEW_TOKENS, **kwargs)
    finally:
        del target.generation_config.dflare_sampling_proposal
    return samples, accepted


def run_sampling_case(case: dict, n: int = 400) -> tuple[float, int]:
    """Sample ``n`` continuations of one case and test them alone: (chi-square p-value, drafts accepted)."""
    from .testing import chi_square_pvalue

    target = sampling_target(case)
    samples, accepted = sample_case(case, target, n)
    return chi_square_pvalue(samples, exact_joint_of(case, target)), accepted


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--greedy", type=int, default=GREEDY_CASES, help=f"greedy cases (default {GREEDY_CASES:,})")
    parser.add_argument("--sampling", type=int, default=SAMPLING_CASES, help=f"sampling cases (default {SAMPLING_CASES:,})")
    parser.add_argument("--continuations", type=int, default=CONTINUATIONS_PER_CASE,
                        help=f"continuations each sampling case samples (default {CONTINUATIONS_PER_CASE})")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a fresh one, printed first)")
    parser.add_argument("--replay", default=None, metavar="KIND:INDEX", help="rerun one case of --seed alone, e.g. greedy:17 or sampling:3")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="case", dynamic_ncols=True, mininterval=2.0)


def _replay(args, seed: int) -> int:
    kind, _, index = args.replay.partition(":")
    if kind not in ("greedy", "sampling") or not index.isdigit():
        raise ValueError(f"--replay {args.replay!r}: expected greedy:INDEX or sampling:INDEX")
    index = int(index)
    if kind == "greedy":
        case = greedy_case(case_draw("greedy", seed, index))
        print(f"greedy case {index}: {case}")
        result = run_greedy_case(case)
        print(f"identical to plain greedy ({result.new_tokens} new tokens, {result.target_forwards} target forwards)")
        return 0
    case = pooled_sampling_case(case_draw("sampling", seed, index))
    print(f"sampling case {index}: {case}")
    pvalue, accepted = run_sampling_case(case, REPLAY_CONTINUATIONS)
    verdict = "FAIL" if pvalue < P_FAIL else "ok"
    print(f"{REPLAY_CONTINUATIONS} continuations alone: chi-square p = {pvalue:.3g} ({verdict}), {accepted} drafts accepted")
    return 1 if pvalue < P_FAIL else 0


def run(args) -> int:
    from .testing import chi_square_pvalue

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"check-lossless: seed {seed} (rerun this run with --seed {seed})", flush=True)
    for name, least in (("greedy", 0), ("sampling", 0), ("continuations", 1), ("threads", 1)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name} {getattr(args, name)}: expected a whole number >= {least}")
    torch.set_num_threads(args.threads)
    logging.getLogger("modeling_dflare").setLevel(logging.WARNING)  # not the kernel timings of every tiny target
    if args.replay:
        return _replay(args, seed)
    start = time.perf_counter()
    failures: list[str] = []

    greedy_ran = greedy_accepted = 0
    with _progress(args.greedy, "greedy") as bar:
        for index in range(args.greedy):
            case = greedy_case(case_draw("greedy", seed, index))
            try:
                result = run_greedy_case(case)
            except Exception as error:  # a crash is a failure of the property too
                failures.append(f"greedy:{index}")
                bar.write(
                    f"FAIL greedy case {index}: {type(error).__name__}: {error}\n  case: {case}\n"
                    f"  replay: dflare check-lossless --seed {seed} --replay greedy:{index}"
                )
            else:
                greedy_ran += 1
                greedy_accepted += result.accepted
            bar.update()
    greedy_seconds = time.perf_counter() - start

    pools: dict[tuple, list[torch.Tensor]] = {}
    targets, joints = {}, {}
    sampling_ran = sampling_accepted = 0
    with _progress(args.sampling, "sampling") as bar:
        for index in range(args.sampling):
            case = pooled_sampling_case(case_draw("sampling", seed, index))
            config = case["config"]
            if config not in targets:
                targets[config] = sampling_target(case)
                joints[config] = exact_joint_of(case, targets[config])
            try:
                samples, accepted = sample_case(case, targets[config], args.continuations)
            except Exception as error:
                failures.append(f"sampling:{index}")
                bar.write(
                    f"FAIL sampling case {index}: {type(error).__name__}: {error}\n  case: {case}\n"
                    f"  replay: dflare check-lossless --seed {seed} --replay sampling:{index}"
                )
            else:
                sampling_ran += 1
                sampling_accepted += accepted
                for pool in ((config, "all"), (config, proposal_group(case))):
                    pools.setdefault(pool, []).append(samples)
            bar.update()

    tested = 0
    for (config, group), parts in sorted(pools.items()):
        samples = torch.cat(parts)
        described = ", ".join(f"{k}={v}" for k, v in SAMPLING_CONFIGS[config].items() if k != "target_seed")
        if samples.shape[0] < MIN_POOL:
            print(f"  sampling pool {config} {group:<15} {samples.shape[0]:>6} continuations: too few to test ({described})")
            continue
        pvalue = chi_square_pvalue(samples, joints[config])
        tested += 1
        verdict = "FAIL" if pvalue < P_FAIL else "ok"
        print(f"  sampling pool {config} {group:<15} {samples.shape[0]:>6} continuations: p = {pvalue:.3g} {verdict} ({described})")
        if pvalue < P_FAIL:
            failures.append(f"pool {config}/{group}")
            print(
                f"FAIL sampling pool {config}/{group}: the samples do not follow the target's distribution; "
                f"replay: dflare check-lossless --seed {seed} --greedy 0 --sampling {args.sampling} --continuations {args.continuations}"
                f" (or one case alone: --seed {seed} --replay sampling:INDEX)"
            )
    seconds = time.perf_counter() - start
    print(
        f"check-lossless: seed {seed}: {greedy_ran}/{args.greedy} greedy cases identical to plain greedy "
        f"({greedy_accepted} with accepted drafts), {sampling_ran}/{args.sampling} sampling cases "
        f"({sampling_ran * args.continuations} continuations, {sampling_accepted} drafts accepted) in {tested} pooled "
        f"chi-square tests; {len(failures)} failure(s); {seconds:.0f} s ({greedy_seconds:.0f} s greedy, {args.threads} thread(s))",
        flush=True,
    )
    return 1 if failures else 0


__all__ = [
    "Draw",
    "GreedyResult",
    "RandomDraw",
    "SAMPLING_CONFIGS",
    "add_arguments",
    "case_draw",
    "greedy_case",
    "pooled_sampling_case",
    "proposal_group",
    "run",
    "run_greedy_case",
    "run_sampling_case",
    "sampling_case",
]
