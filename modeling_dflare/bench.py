"""``dflare bench``: acceptance length and wall-clock speedup of DFlare against every alternative.

One run measures, on the same prompts and machine, with methods interleaved per prompt:

* ``plain``         -- autoregressive greedy ``generate`` (the baseline every output is checked against);
* ``plain-fast``    -- the same on the small-row kernels DFlare verifies on (a one-token step's head as two rows);
* ``dflare``        -- our draft through ``generate(assistant_model=draft)`` (:class:`DFlareCandidateGenerator`);
* ``dflare-stock``  -- the same draft through transformers' ``speculation_type="dflash"`` generator;
* ``dflash``        -- the shipped shared-fusion (DFlash) draft through our generator;
* ``prompt-lookup`` -- transformers' prompt-lookup decoding;
* ``plain-static``  -- plain decoding on a static cache through a ``torch.compile``'d target
  (transformers' compiled decoding; CUDA graphs on a GPU), and ``dflare-static`` -- the draft with
  the fixed-shape verify (``dflare_static_verify=True``, compiled the same way): the fair pair where
  compilation is the point. These two run only when named in ``--methods``, and their target forwards
  are not timed one by one (a hook on a compiled module would be traced into it).

Every method is measured through the same probe, whatever generator it uses: a forward hook on the
target (verify forwards and their time) and a wrapper around the candidate generator that
``generate`` builds (draft time, and per verify cycle the drafts proposed and accepted). Hence tau
(tokens per verify forward, prefill excluded), the accepted-length histogram, the per-position
acceptance curve and the draft / verify / loop-overhead split per cycle.

The free-draft ceiling of a speculative method is ``tau * t1 / t_verify``: the speedup a draft
costing nothing would give at the measured tau, with ``t1`` a cached one-token target forward and
``t_verify`` the cached forward over the mean number of tokens the method verified per cycle, both
measured separately on the dataset's first prompt. ``ceiling_fraction`` is the measured speedup
over ``plain`` divided by it (what the draft and the loop cost), ``draft_share`` the draft's part of
a measured cycle. Both baselines run: ``plain`` and ``plain-fast`` (the best plain decoding here).

Methods: ``dflare`` is the draft alone (prompt lookup off), ``dflare-hybrid`` the same draft with
prompt lookup after the confidence cut, ``dflare-nocut`` the draft with the cut disabled (so the
cut's effect and the generator's are two separate numbers against ``dflare-stock``, which has no
cut), ``dflare-stock`` transformers' own DFlash generator, ``dflare-hybrid-noint8`` the hybrid with
the draft kept in the dtype it was loaded in (on a CPU, an fp32 draft otherwise runs as its int8
copy: :func:`~modeling_dflare.cpu_kernels_dflare.int8_draft`), ``dflare-hybrid-matmul`` and ``dflare-hybrid-packed``
the hybrid verifying on one fixed small-row kernel (``W @ x.T``, or oneDNN's linear on packed weights)
instead of the kernels timed fastest on this machine for each layer and row count
(:func:`~modeling_dflare.cpu_kernels_dflare.small_row_linears`). ShareGPT prompts come from the report
half of the held-out split, which no training or tuning step reads.

Prompt sets (:mod:`~modeling_dflare.bench_datasets`): the standard sets lead (MT-Bench first turns,
reported per category as well, HumanEval, CHAMP's competition math), the ShareGPT report split
after them; ``--num-prompts 8 mtbench=80`` sets one set's count apart from the rest.

``--temperatures 0 0.7 1.0`` runs every method greedily (0) and sampling at each other temperature
(no top-k, top-p or other warper: the temperature alone; ``plain`` is then plain sampling
``generate``). A sampled run's seed is drawn from ``--seed``, the dataset, the prompt and the
temperature, the same for every method and repeat, so a run is reproducible and repeats of one
method must produce the same tokens. Sampled methods produce different (equally distributed) texts,
so their speedup over ``plain`` compares seconds per new token rather than seconds per prompt.

Every greedy output is compared with ``plain``'s token ids; any difference is logged as an error, listed
in the JSON and makes the command exit with status 1. Repeats of one method must agree too. In
bfloat16 a verify forward over many tokens and a one-token forward round differently, so a near-tie
can flip a greedy token without any bug; the JSON's ``first_difference`` and the tokens around it
show which case it is, and the command still fails, on purpose.

Run ``dflare bench --random-drafts`` to exercise every path before trained drafts exist, and
``dflare bench --render runs/bench/bench.json`` to redo the markdown and plots of a finished run.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .bench_datasets import DATASET_NOTES, DATASETS, DEFAULT_DATASETS, BenchPrompt, iter_prompts
from .bench_plan import PLAIN_METHODS
from .bench_report import DEFAULT_LOOKUP_NGRAM
from .timing import measure_forward_costs

logger = logging.getLogger(__name__)

BASELINE = "plain"
METHODS = (
    "plain", "plain-fast", "dflare", "dflare-hybrid", "dflare-hybrid-noint8", "dflare-hybrid-matmul", "dflare-hybrid-packed", "dflare-nocut",
    "dflare-stock", "dflash", "prompt-lookup", "plain-static", "dflare-static",
)
#: Which draft each draft-based method uses (keys of the drafts dict built by :func:`load_drafts`).
METHOD_DRAFT = {
    "dflare": "dflare", "dflare-hybrid": "dflare", "dflare-hybrid-noint8": "dflare", "dflare-hybrid-matmul": "dflare",
    "dflare-hybrid-packed": "dflare", "dflare-nocut": "dflare", "dflare-stock": "dflare", "dflash": "dflash", "dflare-static": "dflare",
}
#: Methods run by our generator (they leave ``draft.dflare_stats``).
OUR_GENERATOR = ("dflare", "dflare-hybrid", "dflare-hybrid-noint8", "dflare-hybrid-matmul", "dflare-hybrid-packed", "dflare-nocut", "dflash",
                 "dflare-static")
#: Methods that run a ``torch.compile``'d target on a static cache: transformers' own compiled decoding
#: (``plain-static``, the fair baseline) and the fixed-shape verify (``dflare-static``). Their target
#: forwards are not timed one by one (a hook on a compiled module would be traced into it).
STATIC_METHODS = ("plain-static", "dflare-static")
#: What runs without ``--methods``: all but the compiled pair (compiling takes minutes on a CPU).
DEFAULT_METHODS = tuple(m for m in METHODS if m not in STATIC_METHODS)
#: Hybrid variants that verify on one fixed small-row kernel instead of the timed choice (``"auto"``).
FIXED_KERNELS = {"dflare-hybrid-matmul": "matmul", "dflare-hybrid-packed": "packed"}
#: The shipped drafts, found next to the package whatever the working folder.
DEFAULT_DRAFT = str(Path(__file__).resolve().parent.parent / "drafts" / "smollm2-dflare")
DEFAULT_DFLASH_DRAFT = str(Path(__file__).resolve().parent.parent / "drafts" / "smollm2-dflash")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the temperatures ``dflare bench`` runs unless told (0: greedy)
DEFAULT_TEMPERATURES = (0.0, 0.7, 1.0)
#: prompts per dataset unless ``--num-prompts`` says otherwise
DEFAULT_NUM_PROMPTS = 8


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


class Clock:
    """Wall clock that first waits for queued GPU work, so a reading covers what ran before it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclasses.dataclass
class Run:
    """One ``generate`` call: new token ids, wall time, per-forward target times, per-cycle
    ``(proposed, accepted)`` drafts (prefill excluded), draft seconds and peak memory in bytes;
    for our generator, ``drafted``: per cycle how many of the proposed came from the draft (the
    rest from the hybrid's prompt lookup)."""

    tokens: list[int]
    seconds: float
    target_seconds: list[float]
    cycles: list[tuple[int, int]]
    draft_seconds: float
    peak_memory: int | None
    drafted: list[int] | None = None


class Probe:
    """Instruments the target and whatever candidate generator ``generate`` builds while active."""

    def __init__(self, target: nn.Module, clock: Clock, time_forwards: bool = True):
        self.target, self.clock, self.time_forwards = target, clock, time_forwards
        self.target_seconds: list[float] = []
        self.cycles: list[tuple[int, int]] = []
        self.draft_seconds = 0.0
        self._pending = (0, False)

    def __enter__(self) -> "Probe":
        from transformers import GenerationMixin

        self._started = 0.0
        self._handles = [
            self.target.register_forward_pre_hook(self._before),
            self.target.register_forward_hook(self._after),
        ] if self.time_forwards else []
        self._original = GenerationMixin._get_candidate_generator
        original, probe = self._original, self

        def _get_candidate_generator(model, *args, **kwargs):
            return probe._instrument(original(model, *args, **kwargs))

        GenerationMixin._get_candidate_generator = _get_candidate_generator
        return self

    def __exit__(self, *exc) -> None:
        from transformers import GenerationMixin

        GenerationMixin._get_candidate_generator = self._original
        for handle in self._handles:
            handle.remove()

    def _before(self, module, args) -> None:
        self._started = self.clock()

    def _after(self, module, args, output) -> None:
        self.target_seconds.append(self.clock() - self._started)

    def _instrument(self, generator):
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

        def timed_get_candidates(input_ids, *args, **kwargs):
            start = self.clock()
            candidate_ids, logits = get_candidates(input_ids, *args, **kwargs)
            self.draft_seconds += self.clock() - start
            self._pending = (candidate_ids.shape[1] - input_ids.shape[1], bool(kwargs.get("is_first_iteration")))
            return candidate_ids, logits

        def recorded_update(input_ids, scores, num_matches):
            proposed, first = self._pending
            if not (first and proposed == 0):  # the prefill-only first iteration is no verify cycle
                self.cycles.append((proposed, int(num_matches)))
            return update(input_ids, scores, num_matches)

        generator.get_candidates = timed_get_candidates
        generator.update_candidate_strategy = recorded_update
        return generator


class PeakMemory:
    """Peak memory while active: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's
    peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; without it the lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def forward_costs(
    target, input_ids: torch.LongTensor, max_length: int, repeats: int, clock, keep_packed: bool = False
) -> dict[str, list[float]]:
    """Target forward costs over 1..``max_length`` new tokens with the stock kernels (what plain
    decoding and prompt lookup run), with the small-row kernels a DFlare draft's generation
    verifies on (:func:`~modeling_dflare.cpu_kernels_dflare.small_row_linears`, key ``small_rows``)
    and with each fixed kernel of :data:`FIXED_KERNELS` (keys ``small_rows_matmul``, ``small_rows_packed``).

    The fixed ``"packed"`` curve packs every weight; unless ``keep_packed`` (a method that runs on
    them is benchmarked), the copies the timed choice does not use are freed again, so the methods'
    peak memory is what a user's ``generate`` holds."""
    from .cpu_kernels_dflare import free_unused_packed_weights, small_row_linears

    costs = {"stock": measure_forward_costs(target, input_ids, max_length, repeats, clock)}
    with small_row_linears(target):
        costs["small_rows"] = measure_forward_costs(target, input_ids, max_length, repeats, clock)
    for kernels in FIXED_KERNELS.values():
        with small_row_linears(target, kernels):
            costs[f"small_rows_{kernels}"] = measure_forward_costs(target, input_ids, max_length, repeats, clock)
    if not keep_packed:
        free_unused_packed_weights(target)
    return costs


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    max_new_tokens: int
    block_size: int
    confidence_threshold: float | None
    prompt_lookup_tokens: int
    #: the longest n-gram dflare-hybrid looks up; None: the draft's own (``prompt_lookup_ngram``)
    lookup_ngram: int | None = None
    #: 0: greedy; above 0: sampling at this temperature, nothing else changing the distribution
    temperature: float = 0.0


def generation_config_for(method: str, target, settings: Settings, draft=None):
    """Generation config of ``method``: greedy, or sampling at ``settings.temperature`` (the DFlare
    knobs ride on it as extra attributes)."""
    config = copy.deepcopy(target.generation_config)
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=settings.max_new_tokens)
    if settings.temperature > 0:
        # the temperature alone: generate fills unset (None) warpers from its defaults (top_k 50), so
        # each is set to its neutral value; plain sampling is the baseline of every sampled method
        config.update(do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0, typical_p=1.0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0)
        if config.min_p is not None:
            config.min_p = 0.0
    config.max_length = None
    if method in STATIC_METHODS:
        config.compile_config = static_compile_config(target.device)
    if method == "plain-static":
        config.cache_implementation = "static"
    elif method == "dflare-static":
        # a whole block every cycle: no cut, no lookup (verify_dflare.py)
        config.dflare_block_size = settings.block_size
        config.dflare_static_verify = True
    elif method in OUR_GENERATOR:
        config.dflare_block_size = settings.block_size
        config.dflare_confidence_threshold = 0.0 if method == "dflare-nocut" else settings.confidence_threshold
        # "dflare"/"dflash" measure the draft alone, "dflare-hybrid" adds prompt lookup after the cut
        # (None: with the draft's own longest n-gram, or DEFAULT_LOOKUP_NGRAM for a draft without the hybrid)
        hybrid = method.startswith("dflare-hybrid")
        draft_lookup_ngram = getattr(getattr(draft, "config", None), "prompt_lookup_ngram", 0) or DEFAULT_LOOKUP_NGRAM
        config.dflare_prompt_lookup_ngram = (settings.lookup_ngram or draft_lookup_ngram) if hybrid else 0
        # "-noint8": the draft in the dtype it was loaded in, not its int8 CPU copy (int8_draft)
        config.dflare_int8_draft = False if method == "dflare-hybrid-noint8" else None
        # "-matmul" / "-packed": verify on one fixed small-row kernel instead of the timed choice
        config.dflare_small_row_kernels = FIXED_KERNELS.get(method)
    elif method == "dflare-stock":
        config.speculation_type = "dflash"
    elif method == "prompt-lookup":
        config.prompt_lookup_num_tokens = settings.prompt_lookup_tokens
    return config


def static_compile_config(device: torch.device):
    """transformers' default compile config (``mode="reduce-overhead"``: CUDA graphs on a GPU), told
    to compile on a CPU as well, where ``generate`` would otherwise run the static cache eagerly."""
    from transformers import CompileConfig

    config = CompileConfig()
    if device.type == "cpu":
        config._compile_all_devices = True  # transformers' own switch for compiling generate on a CPU
    return config


@contextlib.contextmanager
def method_context(method: str, target, draft, settings: Settings) -> Iterator[None]:
    """What a method changes around its ``generate`` call, restored afterwards."""
    if method == "plain-fast":
        # plain decoding on the kernels a DFlare draft's generation verifies on
        from .cpu_kernels_dflare import small_row_linears

        with small_row_linears(target):
            yield
    elif method == "dflare-stock":
        saved = draft.config.block_size  # the stock generator reads the block size from the draft config
        draft.config.block_size = settings.block_size
        try:
            yield
        finally:
            draft.config.block_size = saved
    else:
        yield


@torch.no_grad()
def generate_once(
    method: str, target, input_ids: torch.LongTensor, drafts: dict, settings: Settings, clock: Clock, seed: int | None = None
) -> Run:
    """Run ``method`` once on one prompt [1, n] and measure it; ``seed``: torch's random state is
    seeded with it first (what a sampled run draws from)."""
    draft = drafts.get(METHOD_DRAFT.get(method))
    config = generation_config_for(method, target, settings, draft)
    mask = torch.ones_like(input_ids)
    if seed is not None:
        torch.manual_seed(seed)
    probe = Probe(target, clock, time_forwards=method not in STATIC_METHODS)
    with method_context(method, target, draft, settings), PeakMemory(input_ids.device) as memory, probe:
        start = clock()
        output = target.generate(input_ids, attention_mask=mask, generation_config=config, assistant_model=draft)
        seconds = clock() - start
    tokens = output[0, input_ids.shape[1] :].tolist()
    stats = getattr(draft, "dflare_stats", None) if method in OUR_GENERATOR else None
    drafted = None
    if stats is not None and stats.accepted != [accepted for _, accepted in probe.cycles]:
        logger.warning("%s: draft.dflare_stats disagrees with the measured verify cycles", method)
    elif stats is not None:
        drafted = list(stats.drafted)
    return Run(tokens, seconds, probe.target_seconds, probe.cycles, probe.draft_seconds, memory.peak, drafted)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def random_draft(target, fusion: str, block_size: int, seed: int, device, dtype):
    """An untrained draft for development runs (accepts almost nothing, but exercises every path)."""
    from .configuration_dflare import DFlareConfig
    from .modeling_dflare import DFlareModel

    torch.manual_seed(seed)
    config = DFlareConfig.from_target_config(target.config, fusion=fusion, block_size=block_size)
    return DFlareModel(config).to(device=device, dtype=dtype).eval()


def load_draft(path: str, device, dtype):
    from .modeling_dflare import DFlareModel

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(
            f"no draft at {path!r} (expected a folder with config.json and weights): pass --draft/--dflash-draft, "
            "or --random-drafts for a development run with untrained drafts"
        )
    return DFlareModel.from_pretrained(path, dtype=dtype).to(device).eval()


def load_drafts(args, target, methods: list[str], device, dtype) -> dict[str, Any]:
    """{"dflare": layer-wise draft, "dflash": shared-fusion draft}, only those the methods need."""
    needed = {METHOD_DRAFT[m] for m in methods if m in METHOD_DRAFT}
    paths = {"dflare": (args.draft, "layerwise"), "dflash": (args.dflash_draft, "shared")}
    drafts = {}
    for name in sorted(needed):
        path, fusion = paths[name]
        if args.random_drafts:
            drafts[name] = random_draft(target, fusion, args.block_size or 16, args.seed, device, dtype)
        else:
            drafts[name] = load_draft(path, device, dtype)
        drafts[name].requires_grad_(False)
    return drafts


def encode_prompts(tokenizer, dataset: str, count: int, max_prompt_tokens: int) -> tuple[list[tuple[BenchPrompt, list[int]]], int]:
    """The first ``count`` prompts of ``dataset`` whose chat-templated ids fit ``max_prompt_tokens``;
    returns them with their ids and the number skipped as too long."""
    chosen, skipped = [], 0
    for prompt in iter_prompts(dataset):
        if len(chosen) >= count:
            break
        text = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        chosen.append((prompt, ids))
    if len(chosen) < count:
        logger.warning("%s: only %d prompts of at most %d tokens (wanted %d)", dataset, len(chosen), max_prompt_tokens, count)
    if skipped:
        logger.info("%s: skipped %d prompts longer than %d tokens", dataset, skipped, max_prompt_tokens)
    return chosen, skipped


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (the lower one for an even count)."""
    return sorted(runs, key=lambda run: run.seconds)[(len(runs) - 1) // 2]


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def mismatch_record(dataset: str, prompt_id: str, method: str, expected: list[int], got: list[int], tokenizer, reason: str) -> dict:
    index = first_difference(expected, got)
    record = {
        "dataset": dataset,
        "prompt_id": prompt_id,
        "method": method,
        "reason": reason,
        "first_difference": index,
        "baseline_length": len(expected),
        "method_length": len(got),
        "baseline_tokens": expected[index : index + 8],
        "method_tokens": got[index : index + 8],
    }
    if tokenizer is not None:
        record["baseline_text"] = tokenizer.decode(expected[max(0, index - 8) : index + 8])
        record["method_text"] = tokenizer.decode(got[max(0, index - 8) : index + 8])
    return record


def check_outputs(dataset: str, prompt_id: str, runs: dict[str, list[Run]], tokenizer, temperature: float = 0.0) -> list[dict]:
    """Mismatch records: greedy, a method's tokens differing from ``plain``'s, or from its own other
    repeats; sampled (``temperature`` above 0), a method's repeats differing from its repeat 0
    (every repeat draws from the same seed; methods draw different texts)."""
    problems = []
    for method, method_runs in runs.items():
        expected = method_runs[0].tokens if temperature > 0 else runs[BASELINE][0].tokens
        for repeat, run in enumerate(method_runs):
            if run.tokens != expected:
                if temperature > 0:
                    reason = f"repeat {repeat} differs from repeat 0 under the same seed"
                else:
                    reason = "differs from plain" if method != BASELINE else f"repeat {repeat} differs from repeat 0"
                problems.append(mismatch_record(dataset, prompt_id, method, expected, run.tokens, tokenizer, reason) | {"temperature": temperature})
                break
    for problem in problems:
        logger.error(
            ("SAMPLED REPEAT MISMATCH" if temperature > 0 else "GREEDY MISMATCH") + " %s %s %s at new token %d: expected %s vs %s",
            problem["dataset"],
            problem["prompt_id"],
            problem["method"],
            problem["first_difference"],
            problem["baseline_tokens"],
            problem["method_tokens"],
        )
    return problems


def sample_seed(seed: int, dataset: str, prompt_id: str, temperature: float) -> int:
    """The seed of every sampled run of one prompt at one temperature (all methods and repeats): the
    same on every machine and run for a given ``--seed``."""
    from .data import id_hash

    return id_hash(f"bench-sample/{seed}/{dataset}/{prompt_id}/{temperature:g}")


def run_dataset(dataset, prompts, target, drafts, methods, settings, repeats, clock, tokenizer, bar, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Interleave all methods per prompt (rotating their order), ``repeats`` times each, greedy or
    sampling at ``settings.temperature`` (each prompt's runs seeded by :func:`sample_seed`).

    Returns per-prompt records (the median run of every method) and mismatch records.
    """
    records, mismatches = [], []
    device = target.device
    temperature = settings.temperature
    for index, (prompt, ids) in enumerate(prompts):
        input_ids = torch.tensor([ids], device=device)
        prompt_seed = sample_seed(seed, dataset, prompt.id, temperature) if temperature > 0 else None
        runs: dict[str, list[Run]] = {m: [] for m in methods}
        for repeat in range(repeats):
            shift = (index + repeat) % len(methods)
            for method in methods[shift:] + methods[:shift]:
                bar.set_postfix_str(f"{dataset} {prompt.id} {method}" + (f" T={temperature:g}" if temperature > 0 else ""), refresh=False)
                runs[method].append(generate_once(method, target, input_ids, drafts, settings, clock, prompt_seed))
                bar.update(1)
        mismatches += check_outputs(dataset, prompt.id, runs, tokenizer, temperature)
        medians = {m: median_run(r) for m, r in runs.items()}
        records.append({"dataset": dataset, "temperature": temperature, "prompt": prompt, "prompt_tokens": len(ids), "runs": medians})
    return records, mismatches


def warm_up(target, input_ids, drafts, methods, settings, clock, temperatures=(0.0,)) -> None:
    """One short run of every method, greedy and (when any of ``temperatures`` samples) sampled, so
    first-call allocations stay out of the timings."""
    short = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, 16))
    kinds = ([0.0] if any(t == 0 for t in temperatures) else []) + [t for t in temperatures if t > 0][:1]
    for temperature in kinds or [0.0]:
        for method in methods:
            generate_once(method, target, input_ids, drafts, dataclasses.replace(short, temperature=temperature), clock,
                          0 if temperature > 0 else None)


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------


def position_acceptance(cycles: list[tuple[int, int]], width: int) -> list[float | None]:
    """Fraction of cycles that accepted the draft at position k (1-based), among those proposing it."""
    curve = []
    for k in range(1, width):
        proposing = [accepted for proposed, accepted in cycles if proposed >= k]
        curve.append(sum(a >= k for a in proposing) / len(proposing) if proposing else None)
    return curve


def summarize(dataset: str, method: str, records: list[dict], costs: dict[str, list[float]], block_size: int) -> dict:
    """Aggregate the median runs of ``method`` over a dataset's prompts (at one temperature).

    ``speedup``: greedy, plain's seconds over the method's (both made the same tokens); sampled, the
    same per new token (the texts differ, and so may their lengths)."""
    runs = [record["runs"][method] for record in records]
    base = [record["runs"][BASELINE] for record in records]
    temperature = records[0].get("temperature", 0.0) if records else 0.0
    tokens = sum(len(run.tokens) for run in runs)
    seconds = sum(run.seconds for run in runs)
    base_seconds, base_tokens = sum(run.seconds for run in base), sum(len(run.tokens) for run in base)
    if temperature > 0:
        speedup = (base_seconds / base_tokens) / (seconds / tokens) if seconds and tokens and base_tokens else 0.0
    else:
        speedup = base_seconds / seconds if seconds else 0.0
    cycles = [cycle for run in runs for cycle in run.cycles]
    speculative = method not in PLAIN_METHODS
    verify = sum(sum(run.target_seconds[1:]) for run in runs)
    prefill = sum(run.target_seconds[0] for run in runs if run.target_seconds)
    draft = sum(run.draft_seconds for run in runs)
    steps = len(cycles) if speculative else sum(max(len(run.target_seconds) - 1, 0) for run in runs)
    tau = (sum(a for _, a in cycles) + len(cycles)) / len(cycles) if cycles else 1.0
    width = max([block_size] + [p + 1 for p, _ in cycles])
    summary = {
        "dataset": dataset,
        "method": method,
        "temperature": temperature,
        "prompts": len(runs),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "speedup": speedup,
        "tau": tau,
        "cycles": steps,
        "target_forwards": sum(len(run.target_seconds) for run in runs),
        "histogram": histogram(cycles, width) if speculative else None,
        "position_acceptance": position_acceptance(cycles, width) if speculative else None,
        "mean_proposed": sum(p for p, _ in cycles) / len(cycles) if cycles else 0.0,
        "prefill_ms": 1000 * prefill / len(runs) if runs else 0.0,
        "draft_ms_per_cycle": 1000 * draft / steps if steps else 0.0,
        "verify_ms_per_cycle": 1000 * verify / steps if steps else 0.0,
        "overhead_ms_per_cycle": 1000 * (seconds - prefill - verify - draft) / steps if steps else 0.0,
        "peak_memory_mib": max((run.peak_memory or 0) for run in runs) / 2**20 if runs else None,
    }
    # DFlare drafts (ours and the stock DFlash path) verify on the small-row kernels, other methods on stock ones
    kernels = (f"small_rows_{FIXED_KERNELS[method]}" if method in FIXED_KERNELS
               else "small_rows" if method in METHOD_DRAFT and method not in STATIC_METHODS else "stock")
    verify_costs = costs.get(kernels) if costs else None
    summary.update(free_draft_ceiling(summary, cycles, costs.get("stock") if costs else None, verify_costs, speculative))
    summary["by_source"] = proposal_sources(runs) if speculative else None
    return summary


def proposal_sources(runs: list[Run]) -> dict | None:
    """Proposed and accepted tokens by where they came from: ``{"draft": {...}, "lookup": {...}}``,
    each with ``proposed``, ``accepted`` and ``acceptance`` (accepted / proposed; a cycle's drafts
    come first, so its accepted tokens are the draft's up to their count, then the lookup's).
    None when a run has no per-cycle record of it (methods other than our generator)."""
    if not runs or any(run.drafted is None or len(run.drafted) != len(run.cycles) for run in runs):
        return None
    counts = {"draft": [0, 0], "lookup": [0, 0]}
    for run in runs:
        for (proposed, accepted), drafted in zip(run.cycles, run.drafted):
            counts["draft"][0] += drafted
            counts["draft"][1] += min(accepted, drafted)
            counts["lookup"][0] += proposed - drafted
            counts["lookup"][1] += max(0, accepted - drafted)
    return {
        source: {"proposed": proposed, "accepted": accepted, "acceptance": accepted / proposed if proposed else None}
        for source, (proposed, accepted) in counts.items()
    }


def histogram(cycles: list[tuple[int, int]], width: int) -> list[int]:
    """How many verify cycles accepted 0, 1, ..., width - 1 drafts."""
    counts = [0] * width
    for _, accepted in cycles:
        counts[min(accepted, width - 1)] += 1
    return counts


def free_draft_ceiling(summary: dict, cycles, plain_costs: list[float] | None, costs: list[float] | None, speculative: bool) -> dict:
    """What a zero-cost draft would reach at this τ: ``τ · t1 / t_verify(mean verified length)``.

    ``t1`` (``plain_costs[0]``, plain decoding's step) and ``t_verify`` (from ``costs``, the kernels
    this method verifies on) come from separately measured forward costs (not from this method's
    own timings), so the ceiling is an independent yardstick: ``ceiling_fraction`` (speedup /
    ceiling) is how much of it the draft and loop overheads leave, and ``draft_share`` is the
    draft's part of a measured cycle.
    """
    cycle_ms = summary["draft_ms_per_cycle"] + summary["verify_ms_per_cycle"] + summary["overhead_ms_per_cycle"]
    draft_share = summary["draft_ms_per_cycle"] / cycle_ms if speculative and cycle_ms > 0 else None
    if not speculative or not cycles or not costs or not plain_costs:
        return {"ceiling": None, "ceiling_fraction": None, "t_verify_ms": None, "draft_share": draft_share}
    mean_verified = sum(p + 1 for p, _ in cycles) / len(cycles)
    low = max(1, min(int(mean_verified), len(costs)))
    high = min(low + 1, len(costs))
    weight = min(max(mean_verified - low, 0.0), 1.0)
    t_verify = costs[low - 1] * (1 - weight) + costs[high - 1] * weight  # interpolated at the mean length
    ceiling = summary["tau"] * plain_costs[0] / t_verify
    return {"ceiling": ceiling, "ceiling_fraction": summary["speedup"] / ceiling, "t_verify_ms": 1000 * t_verify, "draft_share": draft_share}


def add_relative_speedups(summaries: list[dict]) -> None:
    """Speedups against the other baselines, at the same temperature (sampled: per new token, as
    ``speedup``): ``speedup_vs_plain_fast`` for every method when ``plain-fast`` ran (the best eager
    plain decoding on this machine), and ``speedup_vs_plain_static`` for ``dflare-static`` when
    ``plain-static`` ran (both compiled on a static cache: the fair ratio for the compiled pair)."""
    for column, baseline, methods in (("speedup_vs_plain_fast", "plain-fast", None), ("speedup_vs_plain_static", "plain-static", ("dflare-static",))):
        reference_of = {(s["dataset"], s.get("temperature", 0.0)): s for s in summaries if s["method"] == baseline}
        for summary in summaries:
            if methods is not None and summary["method"] not in methods:
                continue
            reference = reference_of.get((summary["dataset"], summary.get("temperature", 0.0)))
            if reference is None or not reference["seconds"] or not summary["seconds"]:
                summary[column] = None
            elif summary.get("temperature", 0.0) > 0:
                summary[column] = summary["tokens_per_second"] / reference["tokens_per_second"] if reference["tokens_per_second"] else None
            else:
                summary[column] = reference["seconds"] / summary["seconds"]


#: what the per-category rows keep of a dataset row
CATEGORY_KEYS = ("dataset", "method", "temperature", "prompts", "new_tokens", "seconds", "tokens_per_second", "speedup", "tau", "ceiling", "ceiling_fraction")


def category_summaries(dataset: str, records: list[dict], methods: list[str], costs: dict[str, list[float]], block_size: int) -> list[dict]:
    """Per category (``meta["category"]``, in order of first appearance) and method: :func:`summarize`
    over that category's prompts, cut to :data:`CATEGORY_KEYS`. Empty unless every prompt has a category."""
    categories = list(dict.fromkeys(record["prompt"].meta.get("category") for record in records))
    if not categories or None in categories:
        return []
    rows = []
    for category in categories:
        chosen = [record for record in records if record["prompt"].meta["category"] == category]
        for method in methods:
            summary = summarize(dataset, method, chosen, costs, block_size)
            rows.append({"category": category} | {key: summary[key] for key in CATEGORY_KEYS})
    return rows


def per_prompt_rows(records: list[dict], tokenizer) -> list[dict]:
    """Per prompt: plain decoding's text (greedy: every lossless method produced the same) and each method's numbers."""
    rows = []
    for record in records:
        row = {
            "dataset": record["dataset"],
            "temperature": record.get("temperature", 0.0),
            "category": record["prompt"].meta.get("category"),
            "prompt_id": record["prompt"].id,
            "prompt_tokens": record["prompt_tokens"],
            "plain_text": tokenizer.decode(record["runs"][BASELINE].tokens, skip_special_tokens=True),
            "methods": {},
        }
        for method, run in record["runs"].items():
            taus = (sum(a for _, a in run.cycles) + len(run.cycles)) / len(run.cycles) if run.cycles else None
            row["methods"][method] = {"new_tokens": len(run.tokens), "seconds": run.seconds, "tau": taus}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# HumanEval pass@1
# ----------------------------------------------------------------------------------------------

METRIC_PATH = Path(__file__).parent / "metrics" / "humaneval_pass_at_1"


def humaneval_pass_at_1(records: list[dict], methods: list[str], tokenizer, timeout: float) -> dict[str, dict]:
    """pass@1 of each method's HumanEval outputs through the project's ``evaluate`` metric module (at
    the lowest temperature the run used: greedy when it ran)."""
    import evaluate

    metric = evaluate.load(str(METRIC_PATH))
    scores = {}
    coolest = min((r.get("temperature", 0.0) for r in records if r["dataset"] == "humaneval"), default=0.0)
    for method in methods:
        rows = [r for r in records if r["dataset"] == "humaneval" and r.get("temperature", 0.0) == coolest]
        responses = [tokenizer.decode(r["runs"][method].tokens, skip_special_tokens=True) for r in rows]
        result = metric.compute(predictions=responses, references=[r["prompt"].id for r in rows], timeout=timeout)
        scores[method] = {key: result[key] for key in ("pass@1", "passed", "total")}
        logger.info("HumanEval pass@1 %s: %.3f (%d/%d)", method, result["pass@1"], result["passed"], result["total"])
    return scores


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="target folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the target's)")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="DFlare (layer-wise) draft folder")
    parser.add_argument("--dflash-draft", default=DEFAULT_DFLASH_DRAFT, help="DFlash (shared-fusion) draft folder")
    parser.add_argument("--random-drafts", action="store_true", help="untrained random drafts (development only)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="methods to run (plain always runs, and plain-fast beside any speculative method; default: every "
                        "method whose draft fits the target, a default draft that does not fit dropped with a logged line, "
                        "except the compiled pair plain-static / dflare-static, which runs only when named)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DEFAULT_DATASETS),
                        help="prompt sets (default: the standard sets mtbench, humaneval, champ, then the sharegpt report split)")
    parser.add_argument("--num-prompts", nargs="+", default=[str(DEFAULT_NUM_PROMPTS)], metavar="N|DATASET=N",
                        help=f"prompts per dataset (default {DEFAULT_NUM_PROMPTS}); DATASET=N sets one dataset's, e.g. "
                             "'--num-prompts 8 mtbench=80' (categories are taken in turn, so 8 MT-Bench prompts are one per category)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(DEFAULT_TEMPERATURES),
                        help="0: greedy; above 0: sampling at that temperature alone (no top-k/top-p), "
                             "plain sampling generate as the baseline (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    parser.add_argument("--block-size", type=int, default=None, help="draft block size (default: the draft's)")
    parser.add_argument("--confidence-threshold", type=float, default=None, help="DFlare early block stop (default: the draft's)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--lookup-ngram", type=int, default=None,
                        help=f"longest n-gram dflare-hybrid looks up after the cut (default: the draft's own, or {DEFAULT_LOOKUP_NGRAM})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and method; the median counts")
    parser.add_argument("--cost-repeats", type=int, default=5, help="timed forwards per length for the free-draft ceiling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the target's dtype")
    parser.add_argument(
        "--draft-dtype", choices=["auto", *sorted(DTYPES)], default="auto",
        help="the drafts' dtype (auto: bf16 where this machine runs it natively, else fp32; never changes the output)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random drafts and, per prompt, every sampled run")
    parser.add_argument("--output-dir", default="runs/bench")
    parser.add_argument("--humaneval-pass1", action="store_true", help="run the generated HumanEval code (time-limited)")
    parser.add_argument("--exec-timeout", type=float, default=5.0, help="seconds per HumanEval program")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--profile", nargs="*", choices=METHODS, default=None, metavar="METHOD",
        help="after the run, torch.profiler tables of one generate per METHOD (default: plain dflare) on the first prompt",
    )
    parser.add_argument("--render", metavar="BENCH_JSON", default=None, help="only re-render markdown and plots from a bench.json")
    from .chat_templates import add_prompt_format_arguments

    add_prompt_format_arguments(parser)


def prompt_counts(args) -> dict[str, int]:
    """Prompts per dataset of ``args.datasets``: ``--num-prompts N`` for each, ``DATASET=N`` entries
    for that one (:data:`DEFAULT_NUM_PROMPTS` where no plain N is given)."""
    default, counts = parse_num_prompts(args.num_prompts)
    return {dataset: counts.get(dataset, default) for dataset in args.datasets}


def parse_num_prompts(num_prompts) -> tuple[int, dict[str, int]]:
    """``--num-prompts`` values (or one int) as (the count for every dataset, {dataset: its own count})."""
    values = num_prompts if isinstance(num_prompts, (list, tuple)) else [num_prompts]
    default, counts = DEFAULT_NUM_PROMPTS, {}
    for value in map(str, values):
        name, equals, number = value.rpartition("=")
        try:
            count = int(number)
        except ValueError:
            raise ValueError(f"--num-prompts {value}: expected a count N or DATASET=N") from None
        if count < 1:
            raise ValueError(f"--num-prompts {value}: expected >= 1")
        if not equals:
            default = count
        elif name in DATASETS:
            counts[name] = count
        else:
            raise ValueError(f"--num-prompts {value}: unknown dataset {name!r} (expected one of {list(DATASETS)})")
    return default, counts


def validate_arguments(args) -> None:
    prompt_counts(args)
    for name in ("max_new_tokens", "repeats", "cost_repeats", "prompt_lookup_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    temperatures = getattr(args, "temperatures", [0.0])
    if not temperatures or any(not 0.0 <= t < float("inf") for t in temperatures) or len(set(temperatures)) != len(temperatures):
        raise ValueError(f"--temperatures {' '.join(map(str, temperatures))}: expected distinct values >= 0 (0: greedy)")
    if args.block_size is not None and args.block_size < 2:
        raise ValueError(f"--block-size={args.block_size}: expected >= 2 (anchor + at least one draft)")
    if args.confidence_threshold is not None and not 0.0 <= args.confidence_threshold < 1.0:
        raise ValueError(f"--confidence-threshold={args.confidence_threshold}: expected a value in [0, 1)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={args.device}: CUDA is not available on this machine")


def command_line(args) -> str:
    """The ``dflare bench`` command that reproduces this run, every option spelled out."""
    parts = ["dflare", "bench"]
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag] + [str(v) for v in value]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def draft_summary(draft) -> dict:
    config = draft.config
    return {
        "fusion": config.fusion,
        "num_hidden_layers": config.num_hidden_layers,
        "block_size": config.block_size,
        "confidence_threshold": config.confidence_threshold,
        "prompt_lookup": {
            "ngram": getattr(config, "prompt_lookup_ngram", 0),
            "min_ngram": getattr(config, "prompt_lookup_min_ngram", None),
            "confidence": getattr(config, "prompt_lookup_confidence", None),
        },
        "target_layer_ids": list(config.target_layer_ids),
        "parameters": sum(p.numel() for p in draft.parameters()),
    }


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        for line in lines:
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
        # the same model name covers CPUs with and without AVX-512 / native bf16, which decide the timings
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def draft_dtype(args) -> torch.dtype:
    """The drafts' dtype: ``--draft-dtype``, where "auto" is the fastest on this machine."""
    from .cpu_kernels_dflare import fast_draft_dtype

    choice = getattr(args, "draft_dtype", "auto")
    return fast_draft_dtype(args.device) if choice == "auto" else DTYPES[choice]


def load_models(args):
    """(target, tokenizer, drafts, methods) as the arguments ask.

    Before the target loads: the methods are planned for it (:func:`~modeling_dflare.bench_plan.plan_methods`:
    only drafts that fit it, ``plain-fast`` beside any speculative method) and its chat template is
    checked (:func:`~modeling_dflare.target_info.check_prompt_format`)."""
    from .bench_plan import plan_methods
    from .chat_templates import resolve_prompt_format
    from .target_info import check_prompt_format, target_info
    from .targets import load_target, load_tokenizer

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = target_info(args.target)  # a missing target path fails here, in a second
    drafts_given = {"dflare": (args.draft, args.draft != DEFAULT_DRAFT), "dflash": (args.dflash_draft, args.dflash_draft != DEFAULT_DFLASH_DRAFT)}
    methods = plan_methods(args.methods, list(DEFAULT_METHODS), METHOD_DRAFT, drafts_given, info, args.random_drafts)
    uses_draft = any(METHOD_DRAFT.get(m) == "dflare" for m in methods) and not args.random_drafts
    prompt_format = resolve_prompt_format(args, args.draft if uses_draft else None)
    check_prompt_format(args.tokenizer or args.target, prompt_format, None if args.tokenizer else info)
    target = load_target(args.target, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.tokenizer or args.target, prompt_format)
    drafts = load_drafts(args, target, methods, device, draft_dtype(args))
    if args.block_size is None:
        args.block_size = next(iter(drafts.values())).config.block_size if drafts else 16
    return target, tokenizer, drafts, methods


def run_meta(args, target, drafts, settings: Settings, methods: list[str], prompts: dict) -> dict:
    """Everything needed to reproduce and judge a run: date, command, machine, models, settings."""
    from .chat_templates import resolve_prompt_format
    from .cpu_kernels_dflare import draft_head, draft_for_generation

    counts = prompt_counts(args)
    temperatures = [float(t) for t in getattr(args, "temperatures", [0.0])]

    def precision_of(draft) -> str:
        return draft_for_generation(draft, draft_head(draft, target.get_output_embeddings().weight)[0])[2]

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args),
        "hardware": hardware(),
        "device": str(target.device),
        "dtype": args.dtype,
        "draft_dtype": str(next(iter(drafts.values())).dtype).removeprefix("torch.") if drafts else None,
        # what our generator runs each draft as (its int8 CPU copy, or as loaded); "-noint8" methods: as loaded
        "draft_precision": {name: precision_of(d) for name, d in drafts.items()},
        "target": getattr(target.config, "name_or_path", None) or args.target,
        "drafts": {name: getattr(d.config, "_name_or_path", None) or "random" for name, d in drafts.items()},
        "draft_configs": {name: draft_summary(d) for name, d in drafts.items()},
        "random_drafts": bool(args.random_drafts),
        "settings": dataclasses.asdict(settings) | {
            "repeats": args.repeats,
            "num_prompts": parse_num_prompts(args.num_prompts)[0],
            "num_prompts_by_dataset": counts,
            "temperatures": temperatures,
            "greedy": all(t == 0 for t in temperatures),
            "sampling": "temperature only (no top-k, top-p or other warper); plain sampling generate is the baseline",
            "seed": args.seed,
            # what no timing includes: the first calls' one-off costs (allocations, kernel choices, the int8 draft copy)
            "warm_up": "one untimed run of every method before any timed one; forward costs after one untimed round",
            "prompt_format": resolve_prompt_format(args, args.draft if "dflare" in drafts and not args.random_drafts else None).describe(),
        },
        "prompt_splits": {d: DATASET_NOTES.get(d, d) for d in args.datasets},
        "methods": methods,
        "prompts_skipped_too_long": {d: skipped for d, (_, skipped) in prompts.items()},
    }


def run_benchmark(args, target, tokenizer, drafts, methods) -> dict:
    """Everything but loading and writing: returns the JSON-able results."""
    clock = Clock(target.device)
    settings = Settings(args.max_new_tokens, args.block_size, args.confidence_threshold, args.prompt_lookup_tokens, args.lookup_ngram)
    temperatures = [float(t) for t in getattr(args, "temperatures", [0.0])]
    counts = prompt_counts(args)
    prompts = {d: encode_prompts(tokenizer, d, counts[d], args.max_prompt_tokens) for d in args.datasets}
    first = next((p for chosen, _ in prompts.values() for p in chosen[:1]), None)
    if first is None:
        raise ValueError(f"no prompt of at most {args.max_prompt_tokens} tokens in {args.datasets}")
    warm_up(target, torch.tensor([first[1]], device=target.device), drafts, methods, settings, clock, temperatures)
    total = sum(len(chosen) for chosen, _ in prompts.values()) * len(methods) * args.repeats * len(temperatures)
    records, mismatches, summaries, categories, costs = [], [], [], [], {}
    max_verify = max(settings.block_size, settings.prompt_lookup_tokens + 1)
    with tqdm(total=total, desc="bench", unit="gen") as bar:
        for dataset, (chosen, _) in prompts.items():
            if not chosen:
                continue
            context = torch.tensor([chosen[0][1]], device=target.device)
            costs[dataset] = forward_costs(target, context, max_verify, args.cost_repeats, clock,
                                           keep_packed="dflare-hybrid-packed" in methods)
            for temperature in temperatures:
                run_settings = dataclasses.replace(settings, temperature=temperature)
                found, bad = run_dataset(dataset, chosen, target, drafts, methods, run_settings, args.repeats, clock, tokenizer, bar, args.seed)
                records += found
                mismatches += bad
                summaries += [summarize(dataset, m, found, costs[dataset], settings.block_size) for m in methods]
                categories += category_summaries(dataset, found, methods, costs[dataset], settings.block_size)
    add_relative_speedups(summaries)
    for summary in summaries:
        summary["mismatches"] = sum(
            1 for m in mismatches
            if (m["dataset"], m["method"], m.get("temperature", 0.0)) == (summary["dataset"], summary["method"], summary["temperature"])
        )
    results = {
        "meta": run_meta(args, target, drafts, settings, methods, prompts),
        "costs": {
            d: {
                "context_tokens": len(prompts[d][0][0][1]),
                "verify_ms": [1000 * s for s in c["stock"]],
                "verify_ms_small_rows": [1000 * s for s in c["small_rows"]],
                **{f"verify_ms_small_rows_{k}": [1000 * s for s in c[f"small_rows_{k}"]] for k in FIXED_KERNELS.values()},
            }
            for d, c in costs.items()
        },
        "results": summaries,
        "categories": categories,
        "per_prompt": per_prompt_rows(records, tokenizer),
        "mismatches": mismatches,
        "ok": not mismatches,
    }
    if args.humaneval_pass1 and any(r["dataset"] == "humaneval" for r in records):
        scored = [m for m in (BASELINE, "dflare") if m in methods]
        results["humaneval_pass1"] = humaneval_pass_at_1(records, scored, tokenizer, args.exec_timeout)
    return results


def profile_methods(target, input_ids, drafts, methods: list[str], settings: Settings, output_dir: Path) -> dict[str, Path]:
    """One profiled ``generate`` per method: op table sorted by self CPU time, ``profile-<method>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if input_ids.device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if input_ids.device.type == "cuda" else "self_cpu_time_total"
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method in methods:
        with profile(activities=activities) as prof:
            run = generate_once(method, target, input_ids, drafts, settings, Clock(input_ids.device))
        path = output_dir / f"profile-{method}.txt"
        header = f"{method}: {len(run.tokens)} new tokens in {run.seconds:.3f} s (profiled), {len(run.cycles)} verify cycles\n"
        path.write_text(header + prof.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        paths[f"profile_{method}"] = path
    return paths


def write_outputs(results: dict, output_dir: Path, plots: bool) -> dict[str, Path]:
    from .bench_report import plot_acceptance, plot_speedup, render_markdown

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "bench.json", "markdown": output_dir / "bench.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(results))
    if plots:
        paths["speedup_png"] = plot_speedup(results, output_dir / "speedup.png")
        paths["acceptance_png"] = plot_acceptance(results, output_dir / "acceptance.png")
    return paths


def run(args) -> int:
    from .bench_report import render_markdown

    if args.render:
        results = json.loads(Path(args.render).read_text())
        paths = write_outputs(results, Path(args.output_dir), not args.no_plots)
        print(render_markdown(results))
        return 0 if results.get("ok") else 1
    validate_arguments(args)
    target, tokenizer, drafts, methods = load_models(args)
    results = run_benchmark(args, target, tokenizer, drafts, methods)
    paths = write_outputs(results, Path(args.output_dir), not args.no_plots)
    if args.profile is not None:
        profiled = [m for m in (args.profile or [BASELINE, "dflare"]) if m in methods]
        prompt = encode_prompts(tokenizer, args.datasets[0], 1, args.max_prompt_tokens)[0][0][1]
        settings = Settings(args.max_new_tokens, args.block_size, args.confidence_threshold, args.prompt_lookup_tokens, args.lookup_ngram)
        ids = torch.tensor([prompt], device=target.device)
        paths.update(profile_methods(target, ids, drafts, profiled, settings, Path(args.output_dir)))

    print(render_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if results["mismatches"]:
        greedy = [m for m in results["mismatches"] if not m.get("temperature")]
        if greedy:
            print(f"\n*** GREEDY MISMATCH: {len(greedy)} output(s) differ from plain decoding; see {paths['json']} ***", file=sys.stderr)
        if len(greedy) < len(results["mismatches"]):
            print(f"\n*** SAMPLED REPEAT MISMATCH: {len(results['mismatches']) - len(greedy)} sampled output(s) differ between repeats "
                  f"under one seed; see {paths['json']} ***", file=sys.stderr)
        return 1
    return 0


__all__ = ["DEFAULT_METHODS", "METHODS", "add_arguments", "generate_once", "prompt_counts", "run", "run_benchmark", "sample_seed"]
