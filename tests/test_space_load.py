"""The Space under load: the real ``space/app.py`` (real SmolLM2 target, shipped draft, as the app
loads them) driven by many gradio_client visitors at once.

What must hold, and is checked here:

* one comparison at a time, whatever the number of visitors: the server's generation threads never
  overlap (its peak is 1);
* every finished page shows its own run: its prompt and run id echoed, and the text, acceptance
  record and timed pairs it got when it ran alone before the crowd came;
* a cancelled request (``job.cancel()``) or a closed page (the client process killed) stops its
  generation: its thread is gone soon after, and no generation thread is left at the end;
* a full line gets the page's clear "busy" message, and the Space serves normally afterwards;
* memory stays bounded (the server's RSS before and after, within a margin).

The server runs in test mode (``DFLARE_SPACE_TEST=1``), which adds the ``/generation_threads``
endpoint it reads its thread counts from; requests are kept short (``max_new_tokens``, two timed
pairs) so the whole test fits in a few minutes on two busy cores. Run with ``-s`` to see the numbers.
"""

import concurrent.futures
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from test_space import launch_space

CLIENTS = 8  # concurrent visitors; the odd ones cancel midway
QUEUE = 8  # DFLARE_QUEUE_SIZE: all eight fit in the line (one running, seven waiting)
PAIRS = 2  # DFLARE_TIMED_PAIRS
SHORT = 12  # new tokens of a request that finishes
LONG = 160  # new tokens of a request that is stopped before it gets there
BLOCK = 8
MIDWAY_S = 0.4  # how long a cancelling visitor watches its own generation before cancelling
STOP_LIMIT_S = 10.0  # a stopped request's thread must be gone within this (measured: well under 1 s)
RSS_MARGIN_MB = 200

FINISHING = [
    "Translate to French: good morning, my friend.",
    "Write a Python function that adds two numbers.",
    "What is 17 times 3? Answer with the number.",
    "Name three colours of the rainbow.",
]
CANCELLING = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a car engine works.",
    "List twenty animals with one fact about each.",
    "Describe the history of the Roman Empire.",
]


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return _proc_status(pid, "VmRSS") / 1024


class Sampler(threading.Thread):
    """Samples the server's RSS and OS thread count every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak_rss_mb = self.peak_os_threads = 0.0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))
            self.peak_os_threads = max(self.peak_os_threads, _proc_status(self.pid, "Threads"))


def _state(output) -> dict:
    stats = output[4] if len(output) > 4 else None
    return stats if isinstance(stats, dict) else {}


def _wait_until_generating(job, what: str, timeout_s: float = 240) -> int:
    """Run id of ``job`` once its own DFlare generation is streaming."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for output in reversed(job.outputs()):
            state = _state(output)
            if state.get("state", "").startswith("DFlare") and "run" in state:
                return state["run"]
        assert not job.done(), f"{what} ended before it was seen generating: {job.outputs()[-1:]!r}"
        time.sleep(0.05)
    pytest.fail(f"{what} was not seen generating within {timeout_s} s")


def _tagged(run: int, names: list[str]) -> list[str]:
    return [name for name in names if f"-run{run}-" in name]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_space_under_load(tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import ValidationError

    started = time.monotonic()
    env = dict(DFLARE_SPACE_TEST="1", DFLARE_QUEUE_SIZE=str(QUEUE), DFLARE_TIMED_PAIRS=str(PAIRS), DFLARE_STARTUP_TOKENS="0")
    with launch_space(tmp_path, **env) as (url, process, log_path):
        probe = Client(url, verbose=False)

        def workers() -> dict:
            return probe.predict(api_name="/generation_threads")

        def wait_gone(run: int, since: float) -> float:
            while _tagged(run, workers()["threads"]):
                assert time.monotonic() - since < STOP_LIMIT_S, f"run {run} still generating {STOP_LIMIT_S} s after it was stopped"
                time.sleep(0.02)
            return time.monotonic() - since

        # 1. Alone: what each finishing prompt gives with no other visitor.
        reference = {}
        for prompt in FINISHING:
            stats = probe.predict(prompt, SHORT, BLOCK, 0.0, api_name="/compare")[4]
            assert stats.get("identical") is True and stats["prompt"] == prompt, stats
            reference[prompt] = stats
        assert len({stats["dflare_text"] for stats in reference.values()}) == len(FINISHING), "prompts must give distinct texts"
        rss_before = rss_mb(process.pid)
        sampler = Sampler(process.pid)
        sampler.start()

        # 2. Eight visitors at once; the odd ones cancel while their own generation streams.
        clients = [Client(url, verbose=False) for _ in range(CLIENTS)]
        prompts = [p for pair in zip(FINISHING, CANCELLING) for p in pair]

        def visit(i: int) -> dict:
            prompt, cancel = prompts[i], i % 2 == 1
            job = clients[i].submit(prompt, LONG if cancel else SHORT, BLOCK, 0.0, api_name="/compare")
            if not cancel:
                summary, _dflare, _plain, _plot, stats = job.result(timeout=300)
                return {"prompt": prompt, "stats": stats, "summary": summary}
            run = _wait_until_generating(job, f"cancelling visitor {i}")
            time.sleep(MIDWAY_S)
            generating = bool(_tagged(run, workers()["threads"]))
            since = time.monotonic()
            job.cancel()
            return {"prompt": prompt, "run": run, "was_generating": generating, "stop_s": wait_gone(run, since)}

        crowd_start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            visits = list(pool.map(visit, range(CLIENTS)))
        crowd_s = time.monotonic() - crowd_start
        finished = [v for v in visits if "stats" in v]
        cancelled = [v for v in visits if "stop_s" in v]

        # 3. A full line: one comparison running, QUEUE waiting; the next visitor is told, clearly.
        line = [Client(url, verbose=False) for _ in range(QUEUE + 2)]
        blocker = line[0].submit("Write a long essay about the sea and its storms.", 256, BLOCK, 0.0, api_name="/compare")
        blocker_run = _wait_until_generating(blocker, "the running comparison")
        waiting = []
        for k, client in enumerate(line[1 : QUEUE + 1]):
            job = client.submit(f"Say the number {k}.", SHORT, BLOCK, 0.0, api_name="/compare")
            deadline = time.monotonic() + 60
            while job.status().code.name != "IN_QUEUE":
                assert time.monotonic() < deadline and not job.done(), f"waiting visitor {k}: {job.status()}"
                time.sleep(0.05)
            waiting.append(job)
        with pytest.raises(ValidationError) as refused:
            line[-1].predict("One more, please.", SHORT, BLOCK, 0.0, api_name="/compare")
        busy = str(refused.value)
        for job in reversed(waiting):
            job.cancel()
        since = time.monotonic()
        blocker.cancel()
        blocker_stop_s = wait_gone(blocker_run, since)

        # 4. A visitor who closes the page: its client process dies mid-generation.
        script = textwrap.dedent(f"""
            import sys, time
            from gradio_client import Client
            job = Client({url!r}, verbose=False).submit({CANCELLING[0]!r}, {LONG}, {BLOCK}, 0.0, api_name="/compare")
            while True:
                states = [o[4] for o in job.outputs() if isinstance(o[4], dict) and str(o[4].get("state", "")).startswith("DFlare")]
                if states:
                    print(states[-1]["run"], flush=True)
                    time.sleep(600)
                time.sleep(0.05)
        """)
        visitor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            abandoned_run = int(visitor.stdout.readline())
            time.sleep(MIDWAY_S)
            since = time.monotonic()
            visitor.kill()
            abandoned_stop_s = wait_gone(abandoned_run, since)
        finally:
            visitor.kill()
            visitor.wait()

        # 5. The Space still serves, and correctly.
        after = probe.predict(FINISHING[0], SHORT, BLOCK, 0.0, api_name="/compare")[4]
        sampler.stop.set()
        sampler.join()
        final = workers()
        rss_after = rss_mb(process.pid)
        log = log_path.read_text()

    wall_s = time.monotonic() - started
    stop_times = [v["stop_s"] for v in cancelled]
    print(
        f"\nSpace load test: {CLIENTS} concurrent clients, {len(cancelled)} cancelled midway, {len(finished)} finished "
        f"in {crowd_s:.1f} s (whole test {wall_s:.1f} s, {PAIRS} timed pairs per comparison, {SHORT} new tokens); "
        f"cancelled threads gone in {min(stop_times):.2f}-{max(stop_times):.2f} s; full line ({QUEUE} waiting) refused; "
        f"running one stopped in {blocker_stop_s:.2f} s; closed page stopped in {abandoned_stop_s:.2f} s; "
        f"generation threads: peak {final['peak']} at once, {final['started']} started, {final['finished']} finished, "
        f"{final['alive']} alive at the end; server OS threads peak {sampler.peak_os_threads:.0f}; "
        f"RSS {rss_before:.0f} MB before, {sampler.peak_rss_mb:.0f} MB peak, {rss_after:.0f} MB after"
    )

    # one comparison at a time, none left behind
    assert final["peak"] == 1, final
    assert final["alive"] == 0 and final["threads"] == [] and final["started"] == final["finished"], final
    # every finished page shows its own run
    assert len(finished) == len(cancelled) == CLIENTS // 2
    runs = [v["stats"]["run"] for v in finished] + [v["run"] for v in cancelled]
    assert len(set(runs)) == CLIENTS, runs
    for v in finished + [{"prompt": FINISHING[0], "stats": after, "summary": ""}]:
        stats, alone = v["stats"], reference[v["prompt"]]
        assert "error" not in stats and stats["prompt"] == v["prompt"], stats
        assert stats["dflare_text"] == stats["plain_text"] == alone["plain_text"], (v["prompt"], stats["dflare_text"])
        assert stats["identical"] is True and stats["accepted_per_forward"] == alone["accepted_per_forward"]
        assert stats["tau"] == alone["tau"] and stats["dflare_tokens"] == alone["dflare_tokens"]
        assert stats["timed_pairs"] == PAIRS == len(stats["dflare_seconds"]) == len(stats["plain_seconds"])
        assert not v["summary"] or f"median of {PAIRS} timed DFlare/plain pairs" in v["summary"]
    # cancelled and abandoned requests stopped their own generation
    assert all(v["was_generating"] for v in cancelled), cancelled
    assert max(stop_times + [blocker_stop_s, abandoned_stop_s]) < STOP_LIMIT_S
    assert log.count("(cancelled or abandoned)") >= len(cancelled) + 2, log[-3000:]
    # the full line's message says what happened and what to do
    assert "The Space is busy" in busy and f"{QUEUE} more are waiting" in busy and "try again" in busy, busy
    # memory stays bounded
    assert rss_after - rss_before < RSS_MARGIN_MB, (rss_before, rss_after)
