"""``dflare demo``: interleaved timed pairs, and the real target with the shipped draft end to end."""

import subprocess
import sys

import pytest
import torch

from modeling_dflare.demo import timed_pairs


def test_timed_pairs_alternate_which_side_runs_first_and_check_every_pair():
    calls = []
    same = torch.tensor([[1, 2, 3]])

    def plain():
        calls.append("plain")
        return same

    def dflare():
        calls.append("dflare")
        return same, "stats"

    plain_s, dflare_s, (p, d, stats), identical = timed_pairs(plain, dflare, 4)
    assert calls == ["plain", "dflare", "dflare", "plain", "plain", "dflare", "dflare", "plain"]
    assert len(plain_s) == len(dflare_s) == 4 and all(t >= 0 for t in plain_s + dflare_s)
    assert identical and stats == "stats" and torch.equal(p, d)

    outputs = iter([same, torch.tensor([[1, 2, 4]])])
    *_, identical = timed_pairs(lambda: next(outputs), dflare, 2)
    assert not identical  # the second pair differed: the demo reports it and exits 1


@pytest.mark.slow
def test_demo_prints_identical_text_and_how_many_pairs_were_timed():
    result = subprocess.run(
        [sys.executable, "-m", "dflare_cli", "demo", "--prompt", "Name three colours.", "--max-new-tokens", "12", "--repeats", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical to plain: yes" in result.stdout
    assert "median of 2 timed pairs" in result.stdout
    assert "median of 2 interleaved plain/DFlare pairs per prompt" in result.stdout
    assert "OVERALL:" in result.stdout and "acceptance length" in result.stdout


def test_demo_refuses_zero_repeats():
    result = subprocess.run([sys.executable, "-m", "dflare_cli", "demo", "--repeats", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--repeats 0: expected at least 1" in result.stderr
