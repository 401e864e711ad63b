"""DFlare Space: the same prompt decoded by DFlare speculative decoding and by plain decoding, live.

Run locally with ``make space`` (embedded SmolLM2 target, shipped draft, offline). On the Hub the
models come from environment variables (see README.md): ``DFLARE_TARGET`` (a causal LM repo id),
``DFLARE_DRAFT`` (a DFlare draft repo id, loaded with ``trust_remote_code``). This file imports
only gradio, torch and transformers; the ``modeling_dflare`` package is used when it is installed
(local runs) to load the embedded GGUF target and to build a random fallback draft.

One comparison runs at a time, whatever started it (the Run button, the prompt's Enter key, the
API): one endpoint, one Gradio concurrency group of size 1, and one lock around the generation. A
comparison that is cancelled or abandoned stops its generation thread at the next target forward
(a stop event read by a stopping criterion) and joins it before the next comparison may start.
"""

import dataclasses
import html
import itertools
import logging
import math
import os
import queue
import statistics
import threading
import time
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger("dflare.space")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DRAFT = REPO_ROOT / "drafts" / "smollm2-dflare"
HUB_DEFAULT_TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NEW_TOKENS = 256
MAX_PROMPT_TOKENS = int(os.environ.get("DFLARE_MAX_PROMPT_TOKENS", "1024"))
MAX_TEMPERATURE = 2.0
SEED = 0
UPDATE_EVERY_S = 0.1  # at most ~10 page updates per second: rendering must not steal the cores


def _env_int(name: str, default: int, low: int, high: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        number = int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a whole number from {low} to {high}") from None
    if not low <= number <= high:
        raise SystemExit(f"{name}={number}: expected a whole number from {low} to {high}")
    return number


#: Timed pairs (one DFlare run + one plain run each) behind the speedup shown: the median of their
#: per-pair ratios. They run after the pair streamed live, which is not timed (it is this prompt's
#: first run, and the page renders beside it); which decoding goes first alternates pair to pair.
TIMED_PAIRS = _env_int("DFLARE_TIMED_PAIRS", 3, 1, 20)
#: Comparisons that may wait behind the running one; one more is told the Space is busy.
QUEUE_SIZE = _env_int("DFLARE_QUEUE_SIZE", 8, 1, 1000)
#: Gradio's own hard bound sits a little above QUEUE_SIZE, for requests that pass the busy check at
#: the same instant (those get Gradio's "busy" message instead of this page's).
QUEUE_SLACK = 4
#: Generation threads are named ``WORKER_PREFIX-...`` (counted by the load test).
WORKER_PREFIX = "dflare-generate"
#: ``DFLARE_SPACE_TEST=1`` adds the ``/generation_threads`` endpoint the load test reads.
TEST_MODE = os.environ.get("DFLARE_SPACE_TEST") == "1"

EXAMPLES = [
    ["Write a Python function that returns True if a number is prime, with a docstring."],
    ["Give me three tips for sleeping better, one sentence each."],
    ["A train covers 180 km in 2 hours and 15 minutes. What is its average speed in km/h? Think step by step."],
]
EXAMPLE_LABELS = ["Code: prime check", "Chat: sleep tips", "Math: train speed"]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    target: torch.nn.Module
    tokenizer: object
    draft: torch.nn.Module
    target_name: str
    draft_name: str
    notice: str = ""  # shown on top of the page when the draft is not the trained one
    #: Held for a whole comparison: the target's patched layers, ``draft.dflare_stats`` and the global
    #: RNG are shared by every generate call, so only one comparison may use them at a time.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def block_size(self) -> int:
        return int(self.draft.config.block_size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.target.config, "max_position_embeddings", 2048))


def _load_target(source: str | None):
    """(model, tokenizer, display name); ``None`` = the embedded SmolLM2 when the package is installed."""
    try:
        from modeling_dflare import targets
    except ImportError:
        targets = None
    if targets is not None:
        model, tokenizer = targets.load_target(source), targets.load_tokenizer(source)
        return model, tokenizer, source or targets.DEFAULT_TARGET_NAME
    source = source or HUB_DEFAULT_TARGET
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer, source


def _load_draft(source: str | None, target) -> tuple[torch.nn.Module, str, str]:
    """(draft, display name, notice). Falls back to a random draft, with a notice, when none is found."""
    if source is None and LOCAL_DRAFT.is_dir():
        source = str(LOCAL_DRAFT)
    if source is not None:
        draft = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=torch.float32).eval()
        return draft, source, ""
    try:
        from modeling_dflare import DFlareConfig, DFlareModel
    except ImportError as exc:
        raise RuntimeError("no draft: set DFLARE_DRAFT to a DFlare draft repo id or folder") from exc
    torch.manual_seed(SEED)
    draft = DFlareModel(DFlareConfig.from_target_config(target.config)).eval()
    notice = (
        "No trained draft was found (looked for <code>drafts/smollm2-dflare</code> in the repository; "
        "set <code>DFLARE_DRAFT</code> to choose one). This page is running a <b>randomly initialised "
        "draft</b>: almost nothing is accepted, so DFlare will be <b>slower</b> than plain decoding here. "
        "The two outputs are still identical: that is the guarantee, whatever the draft."
    )
    return draft, "random draft (untrained)", notice


def _fast_draft_dtype(draft, device) -> torch.dtype:
    """bf16 where this machine runs it natively, else fp32. The draft's own Hub files decide: the
    helper ``fast_draft_dtype`` lives in its modeling file or, in newer drafts, in the sibling
    ``cpu_kernels_dflare.py``; a draft published before either had it keeps the dtype it was loaded in."""
    import importlib

    module = importlib.import_module(type(draft).__module__)
    choose = getattr(module, "fast_draft_dtype", None)
    if choose is None:
        package = module.__name__.rpartition(".")[0]
        try:
            kernels = importlib.import_module(f"{package}.cpu_kernels_dflare" if package else "cpu_kernels_dflare")
        except ImportError:
            kernels = None
        choose = getattr(kernels, "fast_draft_dtype", None)
    return choose(device) if choose is not None else draft.dtype


def load_models() -> Models:
    target, tokenizer, target_name = _load_target(os.environ.get("DFLARE_TARGET") or None)
    target.requires_grad_(False)
    draft, draft_name, notice = _load_draft(os.environ.get("DFLARE_DRAFT") or None, target)
    draft.to(target.device, _fast_draft_dtype(draft, target.device))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("target %s, draft %s (%s)", target_name, draft_name, draft.dtype)
    return Models(target, tokenizer, draft, target_name, draft_name, notice)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A problem with what the visitor asked for; its message is shown in the page as is."""


def _number(value, name: str, low: float, high: float, integer: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value!r}.")
    if integer and number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(number) if integer else number


def encode_prompt(models: Models, prompt) -> torch.Tensor:
    """Prompt ids [1, length] through the chat template, or an InputError a visitor can act on."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty: type a question or pick one of the examples.")
    limit = min(MAX_PROMPT_TOKENS, models.context_length - MAX_NEW_TOKENS)
    if len(prompt) > 20 * limit:  # no tokenizer turns this into fewer than `limit` tokens; skip the work
        raise InputError(f"The prompt is {len(prompt):,} characters: far above this demo's {limit:,}-token limit.")
    tokenizer = models.tokenizer
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] > limit:
        raise InputError(
            f"The prompt is {ids.shape[1]:,} tokens; this demo accepts up to {limit:,} "
            f"(the model's context is {models.context_length:,} tokens, and it runs on a small CPU). Shorten it."
        )
    return ids


def check_controls(models: Models, max_new_tokens, block_size, temperature) -> tuple[int, int, float]:
    return (
        _number(max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS, integer=True),
        _number(block_size, "Block size", 2, models.block_size, integer=True),
        _number(temperature, "Temperature", 0.0, MAX_TEMPERATURE, integer=False),
    )


# ----------------------------------------------------------------------------------------------
# Generation with live token chunks
# ----------------------------------------------------------------------------------------------


class ChunkStreamer(BaseStreamer):
    """Queues the new token ids of every target forward (one ``put`` each), with their arrival time."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.start = time.perf_counter()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.queue.put((value.reshape(-1).tolist(), time.perf_counter() - self.start))

    def end(self) -> None:
        pass  # the worker's `finally` closes the queue, also after an exception


class StopOnEvent(StoppingCriteria):
    """Stops ``generate`` at its next check (after the current target forward) once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Workers:
    """The generation threads of this process: alive now, the most alive at once, started, finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.alive = self.peak = self.started = self.finished = 0

    def enter(self) -> None:
        with self._lock:
            self.alive += 1
            self.started += 1
            self.peak = max(self.peak, self.alive)

    def leave(self) -> None:
        with self._lock:
            self.alive -= 1
            self.finished += 1

    def snapshot(self) -> dict:
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX))
        with self._lock:
            counts = {"alive": self.alive, "peak": self.peak, "started": self.started, "finished": self.finished}
        return {**counts, "threads": names}


WORKERS = Workers()
RUN_IDS = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Accepted drafts per target verify forward of one DFlare generate call, copied when that call
    returned (``draft.dflare_stats`` is replaced by the next call)."""

    accepted: tuple[int, ...]

    @classmethod
    def of(cls, stats) -> "Acceptance":
        return cls(tuple(int(n) for n in stats.accepted))

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens gained per target verify forward (accepted drafts + 1 bonus)."""
        return (sum(self.accepted) + self.cycles) / self.cycles if self.cycles else 0.0

    def histogram(self, block_size: int) -> list[int]:
        counts = [0] * block_size
        for n in self.accepted:
            counts[min(n, block_size - 1)] += 1
        return counts


@dataclasses.dataclass
class Run:
    """One decoding of the prompt: token chunks as they arrive, then the result."""

    chunks: list[list[int]] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    seconds: float = 0.0
    done: bool = False
    error: BaseException | None = None
    acceptance: Acceptance | None = None  # DFlare runs: this run's own acceptance record

    @property
    def ids(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]

    @property
    def tokens_per_second(self) -> float:
        time_s = self.seconds if self.done else self.elapsed
        return len(self.ids) / time_s if time_s > 0 else 0.0


def generation_config(models: Models, max_new_tokens: int, block_size: int, temperature: float) -> GenerationConfig:
    tokenizer = models.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    config.dflare_block_size = block_size  # read by the DFlare candidate generator; unknown to generate() kwargs
    return config


def stream(models: Models, prompt_ids: torch.Tensor, config: GenerationConfig, assistant=None, name: str = "run"):
    """Yield the same growing :class:`Run` while ``generate`` runs in a worker thread; last yield has done=True.

    Yields at least every ``UPDATE_EVERY_S`` (new tokens or not), so a caller that stops iterating is
    noticed soon. Closing this generator early (a cancelled or abandoned request) sets the stop
    event, which ends ``generate`` after its current target forward, and waits for the worker: no
    generation thread outlives its caller. The caller must hold ``models.lock``.
    """
    run, streamer, stop = Run(), ChunkStreamer(), threading.Event()
    inputs = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
    criteria = StoppingCriteriaList([StopOnEvent(stop)])

    def work() -> None:
        WORKERS.enter()
        try:
            torch.manual_seed(SEED)  # sampling: the same seed for every run, so a rerun gives the same text
            previous = getattr(assistant, "dflare_stats", None)
            streamer.start = time.perf_counter()
            try:
                with torch.inference_mode():
                    models.target.generate(
                        **inputs, generation_config=config, assistant_model=assistant, streamer=streamer,
                        stopping_criteria=criteria,
                    )
                run.seconds = time.perf_counter() - streamer.start
                stats = getattr(assistant, "dflare_stats", None)
                if stats is not None and stats is not previous:  # this call's record, not an older one
                    run.acceptance = Acceptance.of(stats)
            except BaseException as exc:  # handed to the page's thread, which reports it
                run.seconds = time.perf_counter() - streamer.start
                run.error = exc
        finally:
            streamer.queue.put(None)
            WORKERS.leave()

    worker = threading.Thread(target=work, name=f"{WORKER_PREFIX}-{name}", daemon=True)
    worker.start()
    try:
        last_yield = time.perf_counter()
        while True:
            try:
                item = streamer.queue.get(timeout=UPDATE_EVERY_S)
            except queue.Empty:
                item = ()  # nothing new (a long prefill): yield anyway, so a cancel is seen
            if item is None:
                break
            if item:
                run.chunks.append(item[0])
                run.elapsed = item[1]
            if time.perf_counter() - last_yield >= UPDATE_EVERY_S:
                last_yield = time.perf_counter()
                yield run
    finally:
        stop.set()  # a no-op once generate has returned
        worker.join()
    run.done = True
    yield run


@dataclasses.dataclass
class Timing:
    """The timed (DFlare, plain) pairs of one comparison, in the order they ran (the live pair is not one)."""

    pairs: list[tuple[Run, Run]] = dataclasses.field(default_factory=list)
    orders: list[str] = dataclasses.field(default_factory=list)  # "DFlare, plain" or "plain, DFlare"

    @property
    def speedups(self) -> list[float]:
        """DFlare tokens/s ÷ plain tokens/s of every pair (the two ran back to back)."""
        return [d.tokens_per_second / p.tokens_per_second for d, p in self.pairs if p.tokens_per_second > 0]

    @property
    def speedup(self) -> float:
        return statistics.median(self.speedups) if self.speedups else 0.0

    @property
    def dflare_tokens_per_second(self) -> float:
        return statistics.median(d.tokens_per_second for d, _ in self.pairs) if self.pairs else 0.0

    @property
    def plain_tokens_per_second(self) -> float:
        return statistics.median(p.tokens_per_second for _, p in self.pairs) if self.pairs else 0.0


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


class TokenPieces:
    """Text of each token, decoded incrementally, such that ''.join(pieces) == decode(ids).

    A multi-byte character split over tokens lands on its last token.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pieces: list[str] = []
        self._text = ""

    def __call__(self, ids: list[int]) -> list[str]:
        for end in range(len(self.pieces) + 1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for the rest
                self.pieces.append("")
                continue
            self.pieces.append(text[len(self._text) :] if text.startswith(self._text) else text)
            self._text = text
        return self.pieces


def dflare_kinds(chunks: list[list[int]]) -> list[str]:
    """Source of every token: 'first' (prefill), then per target forward its accepted 'draft's + 1 'bonus'."""
    kinds: list[str] = ["first"] * len(chunks[0]) if chunks else []
    for chunk in chunks[1:]:
        kinds += ["draft"] * (len(chunk) - 1) + ["bonus"]
    return kinds


def render_tokens(pieces: list[str], kinds: list[str] | None) -> str:
    """HTML of the text; with ``kinds``, one box per accepted draft block and one per target token."""
    if kinds is None:
        return html.escape("".join(pieces))
    spans: list[list] = []  # [kind, text]
    for piece, kind in zip(pieces, kinds):
        if spans and kind == "draft" and spans[-1][0] == "draft":
            spans[-1][1] += piece  # a draft block is consecutive drafts; bonus tokens always separate blocks
        else:
            spans.append([kind, piece])
    return "".join(f'<span class="tok {kind}">{html.escape(text)}</span>' for kind, text in spans if text)


def render_pane(title: str, run: Run | None, body: str, waiting: str = "", timing: Timing | None = None, which: int = 0) -> str:
    """A pane: title, live speed, text. With ``timing`` (the final update), the speed is the median
    over the timed runs of this decoding (``which``: 0 DFlare, 1 plain), and says over how many."""
    if run is None:
        speed = f'<span class="pane-speed muted">{html.escape(waiting)}</span>'
    elif timing is not None and timing.pairs:
        median = timing.dflare_tokens_per_second if which == 0 else timing.plain_tokens_per_second
        runs = len(timing.pairs)
        speed = (
            f'<span class="pane-speed"><b>{median:.1f}</b> tokens/s (median of {runs} timed run{"" if runs == 1 else "s"}) · '
            f'{len(run.ids)} token{"" if len(run.ids) == 1 else "s"} · done</span>'
        )
    else:
        state = "done" if run.done else "running…"
        speed = (
            f'<span class="pane-speed"><b>{run.tokens_per_second:.1f}</b> tokens/s · '
            f'{len(run.ids)} token{"" if len(run.ids) == 1 else "s"} · '
            f'{(run.seconds if run.done else run.elapsed):.2f} s · {state}</span>'
        )
    return f'<div class="pane"><div class="pane-head"><b>{html.escape(title)}</b>{speed}</div><div class="tokens">{body}</div></div>'


LEGEND = (
    '<div class="legend">In the DFlare output: <span class="tok draft">accepted draft block</span> '
    "tokens the draft wrote in one pass and the target accepted · "
    '<span class="tok bonus">target token</span> the target\'s own token at the end of each verify forward · '
    '<span class="tok first">first token</span> from the prompt pass</div>'
)


def card(label: str, value: str, note: str = "", cls: str = "") -> str:
    return (
        f'<div class="card {cls}"><div class="card-label">{label}</div>'
        f'<div class="card-value">{value}</div><div class="card-note">{note}</div></div>'
    )


def _speedup_card(speedup: float | None, timing: Timing | None = None, planned: int = 0) -> str:
    if not speedup:
        return card("Speedup", "…", "DFlare tokens/s ÷ plain tokens/s")
    timing_now = f" · timing pair {len(timing.pairs) + 1} of {planned}…" if timing is not None and planned > len(timing.pairs) else ""
    if timing is not None and timing.pairs:
        done, ratios = len(timing.pairs), timing.speedups
        spread = f" · range {min(ratios):.2f}–{max(ratios):.2f}×" if len(ratios) > 1 else ""
        note = f"median of {done} timed DFlare/plain pair{'' if done == 1 else 's'}, interleaved{spread}" + timing_now
    elif timing is not None:
        note = "from the live run, not timed" + timing_now
    else:
        note = "DFlare tokens/s ÷ plain tokens/s"
    if speedup >= 1:
        return card("Speedup", f"{speedup:.2f}×", note, "big")
    return card("Speedup", f"{speedup:.2f}×", note + " · DFlare was slower here: too few drafts accepted to pay for the verify", "slow")


def render_summary(
    dflare: Run | None, plain: Run | None, tau: float | None, check: tuple[str, str, str] | None, caption: str = "",
    timing: Timing | None = None, planned: int = 0,
) -> str:
    """The cards. With ``timing``, speeds are medians over its pairs (``planned``: pairs to be timed in all)."""
    finished = dflare is not None and plain is not None and dflare.done and plain.done
    if timing is not None and timing.pairs:
        speedup, dflare_speed, plain_speed = timing.speedup, timing.dflare_tokens_per_second, timing.plain_tokens_per_second
        runs = len(timing.pairs)
        speed_note = f"median of {runs} timed run{'' if runs == 1 else 's'}"
    else:
        speedup = dflare.tokens_per_second / plain.tokens_per_second if finished and plain.tokens_per_second else None
        dflare_speed = dflare.tokens_per_second if dflare else None
        plain_speed = plain.tokens_per_second if plain else None
        speed_note = ""
    cards = [
        _speedup_card(speedup, timing, planned),
        card("τ (acceptance length)", f"{tau:.2f}" if tau else "…", "tokens per target forward (plain: 1.00)"),
        card("DFlare", f"{dflare_speed:.1f} tok/s" if dflare_speed is not None else "…", speed_note or "draft + verify"),
        card("Plain", f"{plain_speed:.1f} tok/s" if plain_speed is not None else "…", speed_note or "target alone, 1 token per forward"),
    ]
    if check is not None:
        cards.append(card("Output check", check[0], check[1], check[2]))
    complete = finished and check is not None  # the last update: speedup, tau and the output check all shown
    classes = "summary" + (" done" if complete else "") + (" startup" if caption else "")
    done_attr = ' data-done="1"' if complete else ""
    caption_html = f'<div class="caption">{caption}</div>' if caption else ""
    return f'{caption_html}<div class="{classes}"{done_attr}>{"".join(cards)}</div>'


def compare_outputs(dflare_ids: list[int], plain_ids: list[int], sampled: bool) -> tuple[str, str, str, bool]:
    """(headline, explanation, css class, identical) for the output check card."""
    identical = dflare_ids == plain_ids
    if sampled:
        return (
            "Same distribution",
            "temperature > 0: both are samples from the target's distribution (lossless rejection sampling); "
            "different draws, so the texts may differ" + (" (here they happen to match)" if identical else ""),
            "neutral",
            identical,
        )
    if identical:
        return "✓ Identical", f"greedy: all {len(plain_ids)} tokens match, token for token", "good", True
    first = next((i for i, (a, b) in enumerate(zip(dflare_ids, plain_ids)) if a != b), min(len(dflare_ids), len(plain_ids)))
    return "✗ Different", f"greedy outputs differ from token {first}: this is a bug, please report it", "bad", False


def histogram_figure(accepted: list[int], block_size: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [0] * block_size
    for n in accepted:
        counts[min(n, block_size - 1)] += 1
    tau = (sum(accepted) + len(accepted)) / len(accepted) if accepted else 0.0
    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=100)
    ax.bar(range(1, block_size + 1), counts, color="#22c55e", edgecolor="#15803d")
    ax.axvline(tau, color="#ea580c", linestyle="--", label=f"τ = {tau:.2f}")
    ax.set_xlabel("tokens gained per target forward (accepted drafts + 1 bonus)")
    ax.set_ylabel("target forwards")
    ax.set_xticks(range(1, block_size + 1))
    ax.set_title(f"Acceptance length over {len(accepted)} target forwards (plain decoding: always 1)", fontsize=10)
    ax.legend(loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------------------------
# The endpoint
# ----------------------------------------------------------------------------------------------


def message_html(text: str, kind: str = "error") -> str:
    return f'<div class="message {kind}">{html.escape(text)}</div>'


def _empty_stats(error: str) -> dict:
    return {"error": error}


def busy_message(waiting: int) -> str:
    return (
        f"The Space is busy: one comparison is running and {waiting} more are waiting, the most it keeps in line "
        "(comparisons run one at a time, so that every timing has the CPU to itself). Please try again in a minute."
    )


def make_compare(models: Models, pairs: int | None = None):
    """The page's one generation endpoint (the Run button, the prompt's Enter key and ``/compare``)."""
    pairs = TIMED_PAIRS if pairs is None else pairs

    def compare(prompt, max_new_tokens, block_size, temperature):
        """Decode the prompt with DFlare, then with the target alone, both streamed live; then time
        ``pairs`` interleaved pairs. The speedup shown is the median over the timed pairs."""
        try:
            max_new_tokens, block_size, temperature = check_controls(models, max_new_tokens, block_size, temperature)
            prompt_ids = encode_prompt(models, prompt)
        except InputError as exc:
            yield message_html(str(exc)), "", "", None, _empty_stats(str(exc))
            return
        label = {"run": next(RUN_IDS), "prompt": prompt}
        # The queue starts the next comparison as soon as a cancelled one is dropped; its generation
        # thread may still be finishing its last forward. Wait for it here, cancellable.
        while not models.lock.acquire(timeout=UPDATE_EVERY_S):
            yield (
                message_html("Waiting for the comparison before yours to stop…", "info"),
                gr.skip(), gr.skip(), gr.skip(), {**label, "state": "waiting"},
            )
        start = time.perf_counter()
        try:
            yield from _compare(models, prompt_ids, max_new_tokens, block_size, temperature, pairs=pairs, label=label)
            logger.info("run %d: done in %.1f s", label["run"], time.perf_counter() - start)
        except GeneratorExit:  # cancelled, or the page went away: its generation has been stopped and joined
            logger.info("run %d: stopped after %.1f s (cancelled or abandoned)", label["run"], time.perf_counter() - start)
            raise
        except Exception as exc:  # a clear line in the page; the trace goes to the log only
            logger.exception("generation failed")
            text = f"Generation failed: {type(exc).__name__}: {exc}"
            yield message_html(text), "", "", None, _empty_stats(text)
        finally:  # after every generation thread of this comparison has been joined
            models.lock.release()

    return compare


def _compare(
    models: Models, prompt_ids, max_new_tokens: int, block_size: int, temperature: float, caption: str = "",
    pairs: int = TIMED_PAIRS, label: dict | None = None,
):
    """The comparison's updates; the caller holds ``models.lock``. Every number shown comes from the
    runs of this call (their token ids, times and acceptance records), never from shared state."""
    config = generation_config(models, max_new_tokens, block_size, temperature)
    tokenizer = models.tokenizer
    label = dict(label or {})
    tag = f"run{label['run']}" if "run" in label else "run"

    def state(text: str) -> dict:
        return {**label, "state": text}

    waiting = "waiting: runs after DFlare, so the two timings never share the CPU"
    timing = Timing()
    # The live pair: streamed and drawn as it comes. Not timed: it is this prompt's first run, and
    # the page's rendering shares the CPU with it.
    dflare, pieces = None, TokenPieces(tokenizer)
    for dflare in stream(models, prompt_ids, config, models.draft, f"{tag}-dflare-live"):
        if dflare.error is not None:
            raise dflare.error
        body = render_tokens(pieces(dflare.ids), dflare_kinds(dflare.chunks))
        yield (
            render_summary(dflare, None, None, None),
            render_pane("DFlare (speculative)", dflare, body),
            render_pane("Plain decoding", None, "", waiting),
            None,
            state("DFlare, live"),
        )
    tau = dflare.acceptance.acceptance_length if dflare.acceptance else None
    dflare_body = render_tokens(pieces(dflare.ids), dflare_kinds(dflare.chunks))
    plain, pieces = None, TokenPieces(tokenizer)
    for plain in stream(models, prompt_ids, config, None, f"{tag}-plain-live"):
        if plain.error is not None:
            raise plain.error
        yield (
            render_summary(dflare, plain, tau, None),
            render_pane("DFlare (speculative)", dflare, dflare_body),
            render_pane("Plain decoding", plain, render_tokens(pieces(plain.ids), None)),
            None,
            state("plain, live"),
        )
    plain_body = render_tokens(pieces(plain.ids), None)
    # The timed pairs, back to back, nothing drawn but the summary. Which decoding goes first
    # alternates (the live pair ran DFlare first), so a drift in the machine's speed (another
    # process, heat) favours neither.
    for number in range(1, pairs + 1):
        order = ("plain", "DFlare") if number % 2 else ("DFlare", "plain")
        runs = {}
        for kind in order:
            assistant = models.draft if kind == "DFlare" else None
            for run in stream(models, prompt_ids, config, assistant, f"{tag}-{kind.lower()}-{number}"):
                if run.error is not None:
                    raise run.error
                yield (
                    render_summary(dflare, plain, tau, None, timing=timing, planned=pairs),
                    gr.skip(), gr.skip(), gr.skip(),
                    state(f"{kind}, timed pair {number} of {pairs}"),
                )
            runs[kind] = run
        timing.pairs.append((runs["DFlare"], runs["plain"]))
        timing.orders.append(", ".join(order))
    yield _final(models, (dflare, plain), timing, block_size, temperature, dflare_body, plain_body, caption, label)


def _final(
    models: Models, live: tuple[Run, Run], timing: Timing, block_size: int, temperature: float,
    dflare_body: str, plain_body: str, caption: str, label: dict,
):
    tokenizer = models.tokenizer
    dflare, plain = live  # the pair shown in the panes
    sampled = temperature > 0
    headline, note, cls, identical = compare_outputs(dflare.ids, plain.ids, sampled=sampled)
    if identical and not sampled:
        for number, (d, p) in enumerate(timing.pairs, 1):
            if d.ids != plain.ids or p.ids != plain.ids:
                headline, note, cls, identical = (
                    "✗ Different", f"timed pair {number} decoded another greedy output: this is a bug, please report it",
                    "bad", False,
                )
                break
    acceptance = dflare.acceptance or Acceptance(())
    numbers = {
        **label,
        "dflare_text": tokenizer.decode(dflare.ids, skip_special_tokens=True),
        "plain_text": tokenizer.decode(plain.ids, skip_special_tokens=True),
        "identical": identical,
        "sampled": sampled,
        "speedup": round(timing.speedup, 3),
        "timed_pairs": len(timing.pairs),
        "speedup_per_pair": [round(x, 3) for x in timing.speedups],
        "timing_order": list(timing.orders),
        "dflare_seconds": [round(d.seconds, 4) for d, _ in timing.pairs],
        "plain_seconds": [round(p.seconds, 4) for _, p in timing.pairs],
        "tau": round(acceptance.acceptance_length, 3),
        "dflare_tokens_per_s": round(timing.dflare_tokens_per_second, 2),
        "plain_tokens_per_s": round(timing.plain_tokens_per_second, 2),
        "dflare_tokens": len(dflare.ids),
        "plain_tokens": len(plain.ids),
        "target_forwards": acceptance.cycles + 1,
        "accepted_per_forward": list(acceptance.accepted),
        "histogram": acceptance.histogram(block_size),
        "block_size": block_size,
        "target": models.target_name,
        "draft": models.draft_name,
    }
    return (
        render_summary(dflare, plain, acceptance.acceptance_length, (headline, note, cls), caption, timing=timing),
        render_pane("DFlare (speculative)", dflare, dflare_body, timing=timing, which=0),
        render_pane("Plain decoding", plain, plain_body, timing=timing, which=1),
        histogram_figure(list(acceptance.accepted), block_size),
        numbers,
    )


# ----------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------

CSS = """
.intro {font-size: 1.05em}
.summary {display: flex; gap: 10px; flex-wrap: wrap; margin: 4px 0}
.card {flex: 1 1 150px; border: 1px solid #e5e7eb; border-radius: 10px; padding: 8px 12px; background: #f9fafb}
.card-label {font-size: .85em; color: #4b5563; font-weight: 600}
.card-value {font-size: 1.6em; font-weight: 700; color: #111827}
.card-note {font-size: .78em; color: #6b7280}
.card.big {background: #ecfdf5; border-color: #10b981}
.card.big .card-value {font-size: 2.1em; color: #047857}
.card.slow {background: #fffbeb; border-color: #f59e0b} .card.slow .card-value {font-size: 2.1em; color: #b45309}
.card.good {background: #ecfdf5; border-color: #10b981} .card.good .card-value {color: #047857}
.card.bad {background: #fef2f2; border-color: #ef4444} .card.bad .card-value {color: #b91c1c}
.card.neutral {background: #eff6ff; border-color: #3b82f6} .card.neutral .card-value {font-size: 1.2em; color: #1d4ed8}
.pane {border: 1px solid #e5e7eb; border-radius: 10px; padding: 8px 12px; min-height: 140px; background: white}
.pane-head {display: flex; justify-content: space-between; gap: 8px; border-bottom: 1px solid #f3f4f6; padding-bottom: 4px; margin-bottom: 6px; color: #111827}
.pane-speed {font-size: .9em; color: #374151} .muted {color: #9ca3af; font-style: italic}
.tokens {white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9em; line-height: 1.7; color: #111827}
.tok {border-radius: 4px; padding: 1px 0; margin-right: 1px; -webkit-box-decoration-break: clone; box-decoration-break: clone}
.tok.draft {background: #bbf7d0; border: 1px solid #16a34a}
.tok.bonus {background: #fed7aa; border: 1px solid #ea580c}
.tok.first {background: #e5e7eb; border: 1px solid #9ca3af}
.legend .tok {padding: 1px 4px; margin: 0 2px}
.legend {font-size: .85em; color: #374151; margin: 2px 0}
.message {border-radius: 10px; padding: 10px 14px; font-weight: 600}
.message.error {background: #fef2f2; border: 1px solid #ef4444; color: #991b1b}
.message.info {background: #eff6ff; border: 1px solid #3b82f6; color: #1e3a8a}
.caption {font-size: .85em; color: #4b5563; margin: 0 0 4px 2px}
.notice {background: #fffbeb; border: 1px solid #f59e0b; color: #78350f; border-radius: 10px; padding: 8px 12px}
"""

INTRO = """
# ⚡ DFlare: block-diffusion speculative decoding
A small **draft** model fills a whole block of tokens in **one** pass; the **target** model checks the
block in one forward and keeps the prefix it agrees with, plus one token of its own. Same text as the
target alone (greedy: token for token), fewer target forwards. Below, the same prompt runs twice, live:
**DFlare first, then plain decoding**, one after the other so that they do not compete for the CPU.
Then both run {pairs} more times, not drawn, and the speedup is the **median of those {pairs} timed
pairs** (which goes first alternates; the live runs are not timed). The Space runs one comparison at
a time, for everyone; at most {queue} more wait in line.
"""


def build_demo(models: Models, initial: tuple | None = None, pairs: int | None = None, queue_size: int | None = None) -> gr.Blocks:
    """The page; ``initial`` (outputs of one finished comparison) fills the results before the first Run.

    The Run button and the prompt's Enter key trigger one event listener: one function (so one
    ``compare``, which holds ``models.lock``), one concurrency group of size 1, the ``/compare`` API.
    Its validator turns a visitor away with :func:`busy_message` once ``queue_size`` comparisons wait.
    """
    pairs = TIMED_PAIRS if pairs is None else pairs
    queue_size = QUEUE_SIZE if queue_size is None else queue_size
    summary_0, dflare_0, plain_0, plot_0, numbers_0 = initial or (
        render_summary(None, None, None, None),
        render_pane("DFlare (speculative)", None, "", "press Run"),
        render_pane("Plain decoding", None, "", "press Run"),
        None,
        None,
    )
    with gr.Blocks(title="DFlare: speculative decoding, live") as demo:
        gr.Markdown(INTRO.format(pairs=pairs, queue=queue_size), elem_classes="intro")
        gr.Markdown(f"Target: `{models.target_name}` · draft: `{models.draft_name}` · runs on: `{models.target.device}`")
        if models.notice:
            gr.HTML(f'<div class="notice">⚠ {models.notice}</div>', elem_id="draft-notice")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    EXAMPLES[0][0], label="Prompt", lines=3, placeholder="Ask something, or pick an example below", elem_id="prompt"
                )
                gr.Examples(EXAMPLES, inputs=[prompt], example_labels=EXAMPLE_LABELS, label="Examples (code, chat, math)")
            with gr.Column(scale=2):
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens", elem_id="max-new-tokens")
                block = gr.Slider(
                    2, models.block_size, value=models.block_size, step=1,
                    label="Block size (drafts per cycle + 1)", elem_id="block-size",
                )
                temperature = gr.Slider(
                    0.0, MAX_TEMPERATURE, value=0.0, step=0.05,
                    label="Temperature (0 = greedy: outputs identical)", elem_id="temperature",
                )
                run = gr.Button("Run DFlare vs plain", variant="primary", elem_id="run")
        summary = gr.HTML(summary_0, elem_id="summary")
        gr.HTML(LEGEND)
        with gr.Row(equal_height=True):
            dflare_out = gr.HTML(dflare_0, elem_id="dflare-output")
            plain_out = gr.HTML(plain_0, elem_id="plain-output")
        plot = gr.Plot(plot_0, label="Acceptance-length histogram", elem_id="histogram")
        with gr.Accordion("Raw numbers (also what the API returns)", open=False):
            numbers = gr.JSON(numbers_0, label="stats", elem_id="stats")
        gr.Markdown(
            f"Sampling (temperature > 0) uses seed {SEED} for both runs. Speculative and plain sampling draw "
            "their random numbers differently, so their texts differ even with one seed; they are samples "
            "from the **same distribution** (lossless rejection sampling), which is the guarantee."
        )
        inputs = [prompt, max_new, block, temperature]
        outputs = [summary, dflare_out, plain_out, plot, numbers]

        def admit(prompt, max_new_tokens, block_size, temperature):
            """Runs when a request asks to join the queue: refuse it, with the reason, when the line is full."""
            line = getattr(demo, "_queue", None)
            waiting = len(line) if line is not None else 0
            verdicts = [gr.validate(True, "") for _ in inputs]
            if waiting >= queue_size:
                verdicts[0] = gr.validate(False, busy_message(waiting))
            return verdicts

        gr.on(
            triggers=[run.click, prompt.submit], fn=make_compare(models, pairs), inputs=inputs, outputs=outputs,
            api_name="compare", concurrency_limit=1, concurrency_id="generation", validator=admit,
        )
        if TEST_MODE:
            def generation_threads() -> dict:
                """Generation threads of this server (alive, peak, started, finished, names)."""
                return WORKERS.snapshot()

            gr.api(generation_threads, api_name="generation_threads", queue=False)
    return demo


def warm_up(models: Models) -> None:
    """One short run of each path so the first visitor's timings do not include one-off costs."""
    ids = encode_prompt(models, "Hi")
    config = generation_config(models, 4, models.block_size, 0.0)
    with models.lock:
        for assistant, name in ((models.draft, "warm-up-dflare"), (None, "warm-up-plain")):
            for _ in stream(models, ids, config, assistant, name):
                pass


def startup_result(models: Models) -> tuple | None:
    """The first example, compared once at start-up, so a visitor sees a result before pressing Run.

    ``DFLARE_STARTUP_TOKENS`` sets its length (default 48; 0 skips it). Timed like a visitor's run
    (``DFLARE_TIMED_PAIRS`` pairs).
    """
    max_new_tokens = int(os.environ.get("DFLARE_STARTUP_TOKENS", "48"))
    if max_new_tokens <= 0:
        return None
    prompt = EXAMPLES[0][0]
    caption = (
        f"Result computed when this Space started, on this machine, for the first example "
        f"(greedy, {max_new_tokens} new tokens, block {models.block_size}). Press <b>Run</b> to try your own prompt."
    )
    logger.info("start-up example: %d tokens, %d timed pairs", max_new_tokens, TIMED_PAIRS)
    with models.lock:
        *_, last = _compare(
            models, encode_prompt(models, prompt), max_new_tokens, models.block_size, 0.0, caption,
            label={"run": 0, "prompt": prompt},
        )
    return last


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = load_models()
    warm_up(models)
    demo = build_demo(models, startup_result(models))
    # a hard bound above the page's own (see build_demo's validator): the queue's memory stays bounded
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE + QUEUE_SLACK)
    demo.launch(css=CSS, show_error=False)


if __name__ == "__main__":
    main()
