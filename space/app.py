"""DFlare Space: the same prompt decoded by DFlare speculative decoding and by plain decoding, live.

Run locally with ``make space`` (embedded SmolLM2 target, shipped draft, offline). On the Hub the
models come from environment variables (see README.md): ``DFLARE_TARGET`` (a causal LM repo id),
``DFLARE_DRAFT`` (a DFlare draft repo id, loaded with ``trust_remote_code``). This file imports
only gradio, torch and transformers; the ``modeling_dflare`` package is used when it is installed
(local runs) to load the embedded GGUF target and to build a random fallback draft.
"""

import dataclasses
import html
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
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
    """bf16 where this machine runs it natively, else fp32 (the draft's own Hub file decides; a
    draft published before that file had ``fast_draft_dtype`` keeps the dtype it was loaded in)."""
    import importlib

    choose = getattr(importlib.import_module(type(draft).__module__), "fast_draft_dtype", None)
    return choose(device) if choose is not None else draft.dtype


def load_models() -> Models:
    target, tokenizer, target_name = _load_target(os.environ.get("DFLARE_TARGET") or None)
    target.requires_grad_(False)
    draft, draft_name, notice = _load_draft(os.environ.get("DFLARE_DRAFT") or None, target)
    draft.to(target.device, _fast_draft_dtype(draft, target.device))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("target %s, draft %s", target_name, draft_name)
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


@dataclasses.dataclass
class Run:
    """One decoding of the prompt: token chunks as they arrive, then the result."""

    chunks: list[list[int]] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    seconds: float = 0.0
    done: bool = False
    error: BaseException | None = None

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


def stream(models: Models, prompt_ids: torch.Tensor, config: GenerationConfig, assistant=None):
    """Yield the same growing :class:`Run` while ``generate`` runs in a worker thread; last yield has done=True."""
    run, streamer = Run(), ChunkStreamer()
    inputs = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}

    def work() -> None:
        torch.manual_seed(SEED)  # sampling: the same seed for every run, so a rerun gives the same text
        streamer.start = time.perf_counter()
        try:
            with torch.inference_mode():
                models.target.generate(**inputs, generation_config=config, assistant_model=assistant, streamer=streamer)
        except BaseException as exc:  # handed to the page's thread, which reports it
            run.error = exc
        finally:
            run.seconds = time.perf_counter() - streamer.start
            streamer.queue.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    last_yield = 0.0
    while (item := streamer.queue.get()) is not None:
        run.chunks.append(item[0])
        run.elapsed = item[1]
        if time.perf_counter() - last_yield >= UPDATE_EVERY_S:
            last_yield = time.perf_counter()
            yield run
    worker.join()
    run.done = True
    yield run


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


def render_pane(title: str, run: Run | None, body: str, waiting: str = "") -> str:
    if run is None:
        speed = f'<span class="pane-speed muted">{html.escape(waiting)}</span>'
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


def _speedup_card(speedup: float | None) -> str:
    if not speedup:
        return card("Speedup", "…", "DFlare tokens/s ÷ plain tokens/s")
    if speedup >= 1:
        return card("Speedup", f"{speedup:.2f}×", "DFlare tokens/s ÷ plain tokens/s", "big")
    return card("Speedup", f"{speedup:.2f}×", "DFlare was slower here: too few drafts accepted to pay for the verify", "slow")


def render_summary(
    dflare: Run | None, plain: Run | None, tau: float | None, check: tuple[str, str, str] | None, caption: str = ""
) -> str:
    finished = dflare is not None and plain is not None and dflare.done and plain.done
    speedup = dflare.tokens_per_second / plain.tokens_per_second if finished and plain.tokens_per_second else None
    cards = [
        _speedup_card(speedup),
        card("τ (acceptance length)", f"{tau:.2f}" if tau else "…", "tokens per target forward (plain: 1.00)"),
        card("DFlare", f"{dflare.tokens_per_second:.1f} tok/s" if dflare else "…", "draft + verify"),
        card("Plain", f"{plain.tokens_per_second:.1f} tok/s" if plain else "…", "target alone, 1 token per forward"),
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


def make_compare(models: Models):
    lock = threading.Lock()  # the queue already serialises; this also protects direct API calls

    def compare(prompt, max_new_tokens, block_size, temperature):
        """Decode the prompt with DFlare, then with the target alone; stream both with live speed."""
        try:
            max_new_tokens, block_size, temperature = check_controls(models, max_new_tokens, block_size, temperature)
            prompt_ids = encode_prompt(models, prompt)
        except InputError as exc:
            yield message_html(str(exc)), "", "", None, _empty_stats(str(exc))
            return
        with lock:
            try:
                yield from _compare(models, prompt_ids, max_new_tokens, block_size, temperature)
            except Exception as exc:  # a clear line in the page; the trace goes to the log only
                logger.exception("generation failed")
                text = f"Generation failed: {type(exc).__name__}: {exc}"
                yield message_html(text), "", "", None, _empty_stats(text)

    return compare


def _compare(models: Models, prompt_ids, max_new_tokens: int, block_size: int, temperature: float, caption: str = ""):
    config = generation_config(models, max_new_tokens, block_size, temperature)
    tokenizer = models.tokenizer
    waiting = "waiting: runs after DFlare, so the two timings never share the CPU"
    dflare, pieces = None, TokenPieces(tokenizer)
    for dflare in stream(models, prompt_ids, config, assistant=models.draft):
        if dflare.error is not None:
            raise dflare.error
        body = render_tokens(pieces(dflare.ids), dflare_kinds(dflare.chunks))
        yield (
            render_summary(dflare, None, None, None),
            render_pane("DFlare (speculative)", dflare, body),
            render_pane("Plain decoding", None, "", waiting),
            None,
            {},
        )
    stats = models.draft.dflare_stats
    dflare_body = render_tokens(pieces(dflare.ids), dflare_kinds(dflare.chunks))
    plain, pieces = None, TokenPieces(tokenizer)
    for plain in stream(models, prompt_ids, config, assistant=None):
        if plain.error is not None:
            raise plain.error
        yield (
            render_summary(dflare, plain, stats.acceptance_length, None),
            render_pane("DFlare (speculative)", dflare, dflare_body),
            render_pane("Plain decoding", plain, render_tokens(pieces(plain.ids), None)),
            None,
            {},
        )
    plain_body = render_tokens(pieces(plain.ids), None)
    yield _final(models, dflare, plain, stats, block_size, temperature, dflare_body, plain_body, caption)


def _final(
    models: Models, dflare: Run, plain: Run, stats, block_size: int, temperature: float,
    dflare_body: str, plain_body: str, caption: str,
):
    tokenizer = models.tokenizer
    headline, note, cls, identical = compare_outputs(dflare.ids, plain.ids, sampled=temperature > 0)
    speedup = dflare.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else 0.0
    numbers = {
        "dflare_text": tokenizer.decode(dflare.ids, skip_special_tokens=True),
        "plain_text": tokenizer.decode(plain.ids, skip_special_tokens=True),
        "identical": identical,
        "sampled": temperature > 0,
        "speedup": round(speedup, 3),
        "tau": round(stats.acceptance_length, 3),
        "dflare_tokens_per_s": round(dflare.tokens_per_second, 2),
        "plain_tokens_per_s": round(plain.tokens_per_second, 2),
        "dflare_tokens": len(dflare.ids),
        "plain_tokens": len(plain.ids),
        "target_forwards": stats.cycles + 1,
        "accepted_per_forward": list(stats.accepted),
        "histogram": stats.histogram(block_size),
        "block_size": block_size,
        "target": models.target_name,
        "draft": models.draft_name,
    }
    return (
        render_summary(dflare, plain, stats.acceptance_length, (headline, note, cls), caption),
        render_pane("DFlare (speculative)", dflare, dflare_body),
        render_pane("Plain decoding", plain, plain_body),
        histogram_figure(list(stats.accepted), block_size),
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
.caption {font-size: .85em; color: #4b5563; margin: 0 0 4px 2px}
.notice {background: #fffbeb; border: 1px solid #f59e0b; color: #78350f; border-radius: 10px; padding: 8px 12px}
"""

INTRO = """
# ⚡ DFlare: block-diffusion speculative decoding
A small **draft** model fills a whole block of tokens in **one** pass; the **target** model checks the
block in one forward and keeps the prefix it agrees with, plus one token of its own. Same text as the
target alone (greedy: token for token), fewer target forwards. Below, the same prompt runs twice:
**DFlare first, then plain decoding**, one after the other so the timings do not compete for the CPU.
"""


def build_demo(models: Models, initial: tuple | None = None) -> gr.Blocks:
    """The page; ``initial`` (outputs of one finished comparison) fills the results before the first Run."""
    summary_0, dflare_0, plain_0, plot_0, numbers_0 = initial or (
        render_summary(None, None, None, None),
        render_pane("DFlare (speculative)", None, "", "press Run"),
        render_pane("Plain decoding", None, "", "press Run"),
        None,
        None,
    )
    with gr.Blocks(title="DFlare: speculative decoding, live") as demo:
        gr.Markdown(INTRO, elem_classes="intro")
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
        run.click(make_compare(models), inputs, outputs, api_name="compare")
        prompt.submit(make_compare(models), inputs, outputs, api_name=False)
    return demo


def warm_up(models: Models) -> None:
    """One short run of each path so the first visitor's timings do not include one-off costs."""
    ids = encode_prompt(models, "Hi")
    config = generation_config(models, 4, models.block_size, 0.0)
    for assistant in (models.draft, None):
        for _ in stream(models, ids, config, assistant):
            pass


def startup_result(models: Models) -> tuple | None:
    """The first example, compared once at start-up, so a visitor sees a result before pressing Run.

    ``DFLARE_STARTUP_TOKENS`` sets its length (default 48; 0 skips it).
    """
    max_new_tokens = int(os.environ.get("DFLARE_STARTUP_TOKENS", "48"))
    if max_new_tokens <= 0:
        return None
    prompt = EXAMPLES[0][0]
    caption = (
        f"Result computed when this Space started, on this machine, for the first example "
        f"(greedy, {max_new_tokens} new tokens, block {models.block_size}). Press <b>Run</b> to try your own prompt."
    )
    logger.info("start-up example: %d tokens", max_new_tokens)
    *_, last = _compare(models, encode_prompt(models, prompt), max_new_tokens, models.block_size, 0.0, caption)
    return last


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = load_models()
    warm_up(models)
    demo = build_demo(models, startup_result(models))
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(css=CSS, show_error=False)


if __name__ == "__main__":
    main()
