"""The Gradio Space (``space/app.py``): page logic, its API through gradio_client, and a real browser.

The server tests start ``space/app.py`` once per module in a subprocess on a free 127.0.0.1 port,
with the real SmolLM2 target and whatever draft the repo ships (a random one until it exists: the
outputs must be identical either way). The browser test drives Debian's headless Chromium
(``make browser``) with Playwright; no browser is downloaded. Set ``UPDATE_SPACE_SCREENSHOT=1`` to
copy its screenshot to ``space/screenshot.png`` (not done by default, so ``make test`` leaves the
tree clean).
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "space" / "app.py"
# found the way `make browser` checks for it (Debian's package puts it on PATH as `chromium`)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "Write a Python function that reverses a string."
NEW_TOKENS = 24
STARTUP_TIMEOUT_S = 240


def load_app_module():
    spec = importlib.util.spec_from_file_location("dflare_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Page logic, no model
# ----------------------------------------------------------------------------------------------


def test_app_imports_without_loading_models():
    app = load_app_module()
    assert callable(app.build_demo) and callable(app.load_models)


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


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("space") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false", DFLARE_STARTUP_TOKENS="4")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(APP)], cwd=APP.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


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
    assert 0 < stats["dflare_tokens"] == stats["plain_tokens"] <= NEW_TOKENS
    assert stats["tau"] >= 1.0 and stats["speedup"] > 0 and stats["plain_tokens_per_s"] > 0
    assert sum(stats["histogram"]) == len(stats["accepted_per_forward"]) == stats["target_forwards"] - 1
    assert "Speedup" in summary and "Identical" in summary and "tok/s" in summary
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
