"""The Gradio Space (``space/app.py``): page logic, its API through gradio_client, and a real browser.

The server tests start ``space/app.py`` once per module in a subprocess on a free 127.0.0.1 port
(:func:`launch_space`, also used by ``test_space_load.py``), with the real SmolLM2 target and whatever
draft the repo ships (a random one until it exists: the outputs must be identical either way). The
page-logic tests drive the endpoint with a scripted stand-in target (:class:`FakeTarget`): one
comparison at a time, each showing its own numbers, and a closed request stopping its thread. The
browser test drives Debian's headless Chromium (``make browser``) with Playwright; no browser is
downloaded. Set ``UPDATE_SPACE_SCREENSHOT=1`` to copy its screenshot to ``space/screenshot.png``
(not done by default, so ``make test`` leaves the tree clean).
"""

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "space" / "app.py"
# found the way `make browser` checks for it (Debian's package puts it on PATH as `chromium`)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "Write a Python function that reverses a string."
NEW_TOKENS = 24
STARTUP_TIMEOUT_S = 240
SERVER_PAIRS = 2  # timed pairs per comparison in the server tests (the app's default is 3)


def load_app_module():
    spec = importlib.util.spec_from_file_location("dflare_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Page logic, no model
# ----------------------------------------------------------------------------------------------


# A scripted target: the tokens it "generates" depend on the prompt only, so a comparison that
# showed another request's text or acceptance would be caught. It records how many generate calls
# ran at once and whether the app's stopping criterion ended one early.


class FakeTokenizer:
    eos_token_id = pad_token_id = 0
    chat_template = None

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids)


def fake_tokens(prompt: str, count: int) -> list[int]:
    seed = sum(ord(c) for c in prompt)
    return [(seed + n) % 50 + 10 for n in range(count)]


def fake_accepted(prompt: str) -> int:
    """Drafts the stand-in accepts per cycle for this prompt: 0, 1 or 2 (so tau 1, 2 or 3)."""
    return sum(ord(c) for c in prompt) % 3


class FakeTarget:
    device = torch.device("cpu")
    config = types.SimpleNamespace(max_position_embeddings=2048)

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.lock = threading.Lock()
        self.active = self.peak = self.calls = self.stopped = 0

    def generate(self, input_ids, attention_mask, generation_config, assistant_model, streamer, stopping_criteria):
        with self.lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            prompt = "".join(chr(int(i)) for i in input_ids[0])
            budget = generation_config.max_new_tokens
            tokens = fake_tokens(prompt, budget)
            per_cycle = 1 if assistant_model is None else 1 + fake_accepted(prompt)
            streamer.put(input_ids)
            ids, accepted, n = input_ids, [], 0
            while n < budget:
                time.sleep(self.step_s)  # one "target forward"
                new = torch.tensor([tokens[n : n + per_cycle]])
                n += new.shape[1]
                ids = torch.cat([ids, new], dim=1)
                streamer.put(new)
                accepted.append(new.shape[1] - 1)
                if bool(stopping_criteria(ids, None).all()):
                    self.stopped += 1
                    break
            if assistant_model is not None:  # as the DFlare generator does: a new record per call
                assistant_model.dflare_stats = types.SimpleNamespace(accepted=accepted[1:])
            return ids
        finally:
            with self.lock:
                self.active -= 1


def fake_models(app, step_s: float = 0.01):
    draft = types.SimpleNamespace(config=types.SimpleNamespace(block_size=4))
    return app.Models(target=FakeTarget(step_s), tokenizer=FakeTokenizer(), draft=draft, target_name="fake", draft_name="fake")


def final_stats(app, models, prompt, max_new_tokens=12, pairs=3):
    *_, last = app.make_compare(models, pairs)(prompt, max_new_tokens, 4, 0.0)
    return last


def generation_threads(app) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(app.WORKER_PREFIX)]


def test_import_and_page_load_no_model_and_share_one_endpoint(monkeypatch):
    """Importing the app and building its page load no model; the Run button and the prompt's Enter
    key trigger the same listener: one function, one concurrency group of one, the /compare API."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    app = load_app_module()
    demo = app.build_demo(fake_models(app))
    ids = {block.elem_id: block._id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    generating = [fn for fn in demo.fns.values() if fn.name == "compare"]
    assert len(generating) == 1
    fn = generating[0]
    assert set(fn.targets) == {(ids["run"], "click"), (ids["prompt"], "submit")}
    assert fn.concurrency_limit == 1 and fn.concurrency_id == "generation" and fn.api_name == "compare"
    triggered = {target for other in demo.fns.values() for target in other.targets}
    assert (ids["run"], "click") in triggered and sum(t[0] == ids["prompt"] for t in triggered) == 1


def test_busy_check_refuses_with_a_clear_message():
    app = load_app_module()
    demo = app.build_demo(fake_models(app), queue_size=2)
    (fn,) = [fn for fn in demo.fns.values() if fn.name == "compare"]
    demo._queue = [object()]  # one comparison waiting: there is room
    assert all(v["is_valid"] for v in fn.validator("hi", 8, 4, 0.0))
    demo._queue = [object(), object()]  # the line is full
    verdicts = fn.validator("hi", 8, 4, 0.0)
    assert verdicts[0]["is_valid"] is False and all(v["is_valid"] for v in verdicts[1:])
    assert "The Space is busy" in verdicts[0]["message"] and "2 more are waiting" in verdicts[0]["message"]
    assert "try again" in verdicts[0]["message"]


def test_concurrent_requests_run_one_at_a_time_and_show_their_own_numbers():
    """Four requests at once, two prompts with different outputs and acceptance: the generate calls
    never overlap, and every final result carries its own prompt, text, tau and timed pairs."""
    app = load_app_module()
    models = fake_models(app)
    prompts = ["alpha beta", "gamma delta!", "alpha beta", "gamma delta!"]
    assert len({fake_accepted(p) for p in prompts}) == 2
    results = [None] * len(prompts)

    def visit(i):
        results[i] = final_stats(app, models, prompts[i])

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert models.target.peak == 1 and models.target.calls == len(prompts) * (1 + 3) * 2  # the live pair + 3 timed
    assert len({r[4]["run"] for r in results}) == len(prompts)  # every request has its own run id
    for prompt, (summary, dflare_html, plain_html, _plot, stats) in zip(prompts, results):
        text = FakeTokenizer().decode(fake_tokens(prompt, 12))
        assert stats["prompt"] == prompt and stats["dflare_text"] == stats["plain_text"] == text
        assert stats["identical"] is True and stats["tau"] == pytest.approx(1 + fake_accepted(prompt))
        assert stats["timed_pairs"] == 3 and len(stats["speedup_per_pair"]) == 3
        assert stats["timing_order"] == ["plain, DFlare", "DFlare, plain", "plain, DFlare"]  # the live pair ran DFlare first
        assert len(stats["dflare_seconds"]) == len(stats["plain_seconds"]) == 3
        assert "median of 3 timed DFlare/plain pairs" in summary and "median of 3 timed runs" in dflare_html
        assert "Identical" in summary and "median of 3 timed runs" in plain_html
    assert models.lock.acquire(blocking=False)
    assert not generation_threads(app)


def test_closing_a_request_stops_its_generation_and_frees_the_lock():
    """A visitor who cancels or leaves closes the endpoint's generator: the running generate stops at
    its next check, its thread is joined before the lock is released, the next request runs."""
    app = load_app_module()
    models = fake_models(app, step_s=0.02)
    budget = 200  # about 4 s of fake forwards per run, uncancelled
    updates = app.make_compare(models, 3)("stop me please", budget, 4, 0.0)
    for update in updates:
        if update[4].get("state", "").startswith("DFlare") and "tok bonus" in update[1]:
            break
    assert generation_threads(app) and models.target.active == 1
    start = time.perf_counter()
    updates.close()  # what Gradio does when a request is cancelled or its page closed
    closed_s = time.perf_counter() - start
    assert not generation_threads(app) and models.target.active == 0
    assert models.target.stopped == 1 and closed_s < 1.0, closed_s
    assert app.WORKERS.alive == 0 and app.WORKERS.started == app.WORKERS.finished
    assert models.lock.acquire(blocking=False)
    models.lock.release()
    stats = final_stats(app, models, "next visitor", max_new_tokens=6, pairs=1)[4]
    assert stats["prompt"] == "next visitor" and stats["dflare_tokens"] == 6 and stats["timed_pairs"] == 1


def test_timing_takes_the_median_of_pairs():
    app = load_app_module()

    def run(tokens, seconds):
        return app.Run(chunks=[[1] * tokens], seconds=seconds, done=True)

    timing = app.Timing(pairs=[(run(10, 1.0), run(10, 2.0)), (run(10, 1.0), run(10, 1.0)), (run(10, 0.5), run(10, 2.0))])
    assert timing.speedups == [2.0, 1.0, 4.0] and timing.speedup == 2.0
    assert timing.dflare_tokens_per_second == 10.0 and timing.plain_tokens_per_second == 5.0
    summary = app.render_summary(*timing.pairs[0], 1.5, None, timing=timing, planned=5)
    assert "2.00×" in summary and "median of 3 timed DFlare/plain pairs" in summary
    assert "range 1.00–4.00×" in summary and "timing pair 4 of 5" in summary


def test_dflare_kinds_follow_the_cycles():
    app = load_app_module()
    # prefill token, then cycles with 2, 0 and 3 accepted drafts (+1 bonus each)
    kinds = app.dflare_kinds([[5], [1, 2, 3], [4], [6, 7, 8, 9]])
    assert kinds == ["first", "draft", "draft", "bonus", "bonus", "draft", "draft", "draft", "bonus"]
    html = app.render_tokens(["a", "b", "c", "d", "e", "f", "g", "<", "i"], kinds)
    # one box per draft block, one per target token, text escaped
    assert html == ('<span class="tok first">a</span><span class="tok draft">bc</span><span class="tok bonus">d</span>'
                    '<span class="tok bonus">e</span><span class="tok draft">fg&lt;</span><span class="tok bonus">i</span>')


def test_token_pieces_rebuild_the_text():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    text = "def f(x):\n    return x  # é→ü"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    app = load_app_module()
    pieces = app.TokenPieces(tokenizer)
    assert "".join(pieces(ids[:5])) == tokenizer.decode(ids[:5])
    assert "".join(pieces(ids)) == text  # incremental: continues where it stopped, multi-byte characters whole
    assert len(pieces.pieces) == len(ids)


def test_output_check_is_honest():
    app = load_app_module()
    assert app.compare_outputs([1, 2, 3], [1, 2, 3], sampled=False)[3] is True
    headline, note, _, identical = app.compare_outputs([1, 2, 4], [1, 2, 3], sampled=False)
    assert not identical and "2" in note and "bug" in note
    headline, note, _, _ = app.compare_outputs([1], [2], sampled=True)
    assert headline == "Same distribution" and "distribution" in note


def test_summary_is_done_only_with_the_output_check():
    """The page (and the browser test) wait for `.summary.done`: it must not appear before the check card."""
    app = load_app_module()
    dflare, plain = app.Run(chunks=[[1, 2]], seconds=1.0, done=True), app.Run(chunks=[[1, 2]], seconds=2.0, done=True)
    streaming = app.render_summary(dflare, plain, 1.5, None)
    assert "Speedup" in streaming and "summary done" not in streaming and "data-done" not in streaming
    final = app.render_summary(dflare, plain, 1.5, app.compare_outputs([1, 2], [1, 2], sampled=False)[:3])
    assert 'class="summary done"' in final and 'data-done="1"' in final and "Identical" in final


def test_bad_controls_give_a_message():
    app = load_app_module()

    class Draft:
        class config:
            block_size = 16

    models = app.Models(target=None, tokenizer=None, draft=Draft(), target_name="t", draft_name="d")
    for controls, field in [((0, 8, 0.0), "Max new tokens"), ((10, 99, 0.0), "Block size"),
                            ((10, 8, float("nan")), "Temperature"), (("many", 8, 0.0), "Max new tokens"),
                            ((2.5, 8, 0.0), "whole number")]:
        with pytest.raises(app.InputError, match=field):
            app.check_controls(models, *controls)
    with pytest.raises(app.InputError, match="empty"):
        app.encode_prompt(models, "   ")


# ----------------------------------------------------------------------------------------------
# The running Space
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launch_space(folder: Path, **env_overrides):
    """Run ``space/app.py`` as the Space runs it (real target, shipped draft); yields (url, process, log path)."""
    port = _free_port()
    log_path = folder / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false", DFLARE_STARTUP_TOKENS="4",
               DFLARE_TIMED_PAIRS=str(SERVER_PAIRS))
    env.update(env_overrides)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(APP)], cwd=APP.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log_path)
        yield url, process, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    with launch_space(tmp_path_factory.mktemp("space")) as (url, _process, _log):
        yield url


def _wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the Space exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the Space did not answer within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_gradio_client_compare(space_url):
    from gradio_client import Client

    client = Client(space_url, verbose=False)
    summary, dflare_html, plain_html, _plot, stats = client.predict(PROMPT, NEW_TOKENS, 8, 0.0, api_name="/compare")
    assert not stats.get("error"), stats
    assert stats["dflare_text"] == stats["plain_text"] and stats["dflare_text"].strip()
    assert stats["identical"] is True and stats["sampled"] is False
    assert stats["prompt"] == PROMPT and stats["run"] >= 1
    assert 0 < stats["dflare_tokens"] == stats["plain_tokens"] <= NEW_TOKENS
    assert stats["tau"] >= 1.0 and stats["speedup"] > 0 and stats["plain_tokens_per_s"] > 0
    assert stats["timed_pairs"] == SERVER_PAIRS == len(stats["dflare_seconds"]) == len(stats["plain_seconds"])
    assert stats["timing_order"] == ["plain, DFlare", "DFlare, plain"]
    assert stats["speedup"] == pytest.approx(sum(stats["speedup_per_pair"]) / SERVER_PAIRS, abs=2e-3)  # median of two
    assert sum(stats["histogram"]) == len(stats["accepted_per_forward"]) == stats["target_forwards"] - 1
    assert "Speedup" in summary and "Identical" in summary and "tok/s" in summary
    assert f"median of {SERVER_PAIRS} timed DFlare/plain pairs" in summary
    assert 'class="tok bonus"' in dflare_html and "tokens/s" in plain_html

    summary, *_, stats = client.predict("   ", NEW_TOKENS, 8, 0.0, api_name="/compare")
    assert "prompt is empty" in summary and "Traceback" not in summary and stats == {"error": stats["error"]}
    summary, *_ = client.predict("word " * 3000, NEW_TOKENS, 8, 0.0, api_name="/compare")
    assert "Shorten it" in summary and "tokens" in summary


@pytest.mark.slow
@pytest.mark.browser
def test_browser_shows_identical_outputs_and_speedup(space_url, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=args,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.goto(space_url, wait_until="domcontentloaded")
            _run_comparison(page)
            dflare_text = page.inner_text("#dflare-output .tokens")
            plain_text = page.inner_text("#plain-output .tokens")
            summary = page.inner_text("#summary")
            screenshot = tmp_path / "space.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    assert dflare_text.strip() and dflare_text == plain_text
    assert "Speedup" in summary and "×" in summary and "τ" in summary and "Identical" in summary
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SPACE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, REPO / "space" / "screenshot.png")


def _run_comparison(page) -> None:
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    page.wait_for_selector("#summary .summary.done.startup")  # the start-up example is shown before any Run
    page.fill("#prompt textarea", "")
    page.click("#run")  # empty prompt: a message in the page, no generation
    page.wait_for_selector("#summary .message.error", timeout=30_000)
    assert "prompt is empty" in page.inner_text("#summary")
    page.fill("#prompt textarea", PROMPT)
    max_new = page.locator("#max-new-tokens input[type=number]")
    max_new.fill(str(NEW_TOKENS))
    max_new.press("Enter")
    page.click("#run")
    page.wait_for_selector('#summary .summary.done:not(.startup)', timeout=150_000)


def test_draft_dtype_comes_from_the_drafts_own_hub_file():
    """The Space asks the draft's module for its fastest dtype; an older Hub file without the helper
    keeps the draft as loaded instead of failing."""
    import types

    from modeling_dflare import DFlareConfig, DFlareModel
    from modeling_dflare.cpu_kernels_dflare import fast_draft_dtype
    from modeling_dflare.testing import make_target

    app = load_app_module()
    draft = DFlareModel(DFlareConfig.from_target_config(make_target("llama").config))
    assert app._fast_draft_dtype(draft, "cpu") == fast_draft_dtype("cpu")
    old = types.ModuleType("old_hub_modeling_dflare")
    old_class = type("DFlareModel", (DFlareModel,), {"__module__": old.__name__})
    sys.modules[old.__name__] = old
    try:
        draft.__class__ = old_class
        assert app._fast_draft_dtype(draft, "cpu") == draft.dtype
    finally:
        del sys.modules[old.__name__]
