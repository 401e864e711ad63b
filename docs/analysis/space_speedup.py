"""Check (not part of the package; run on r19, 2026-11-28, 2-core AVX-512 Xeon): the Space's own numbers,
read in a real browser.

Starts space/app.py as a visitor's Space starts (start-up example included), opens it in headless
Chromium, reads the start-up summary, then runs each example prompt (code, chat, math) REPEATS times
at the page's default settings (64 new tokens, greedy, the draft's block) and prints each summary's
speedup, τ and whether the outputs were identical. Run it with nothing else on the CPU:

    HF_HUB_OFFLINE=1 python docs/analysis/space_speedup.py [REPEATS]
"""
import os, re, socket, subprocess, sys, time, urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "space"))
from app import EXAMPLES, EXAMPLE_LABELS  # noqa: E402  (imports no model)

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
log = open("/tmp/space-check.log", "w")
app = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py")], cwd=REPO / "space", env=env, stdout=log, stderr=subprocess.STDOUT)
url = f"http://127.0.0.1:{port}/"
try:
    for _ in range(600):
        try:
            urllib.request.urlopen(url, timeout=2); break
        except OSError:
            assert app.poll() is None, open("/tmp/space-check.log").read()[-2000:]
            time.sleep(1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#summary .summary.done.startup", timeout=120_000)

        def numbers(label):
            text = page.inner_text("#summary")
            speed = re.search(r"([0-9.]+)\s*×", text); tau = re.search(r"τ\D*([0-9.]+)", text)
            print(f"{label:28s} speedup {speed.group(1) if speed else '?'}x  tau {tau.group(1) if tau else '?'}  "
                  f"identical {'Identical' in text and 'not identical' not in text.lower()}", flush=True)

        numbers("start-up example (48 tok)")
        for (prompt, *_), label in zip(EXAMPLES, EXAMPLE_LABELS):
            for r in range(REPEATS):
                page.fill("#prompt textarea", prompt)
                page.click("#run")
                page.wait_for_selector("#summary .summary.done:not(.startup)", timeout=300_000)
                numbers(f"{label} run {r + 1}")
                page.evaluate("document.querySelector('#summary .summary.done') && document.querySelector('#summary .summary.done').classList.remove('done')")
        browser.close()
finally:
    app.terminate(); app.wait(timeout=30)
