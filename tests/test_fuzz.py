"""Property tests: DFlare greedy output always equals plain greedy output, and sampled output follows
the target's exact distribution, over random cases of :mod:`modeling_dflare.lossless`.

The case generators are the ones ``dflare check-lossless`` runs by the thousand (docs/testing.md);
here hypothesis draws them (and shrinks a failing one), derandomised so that every run of
``make test`` checks the same fast subset: ``DFLARE_FUZZ_EXAMPLES`` greedy cases (default 120) and
``DFLARE_FUZZ_SAMPLING_EXAMPLES`` sampling cases (default 8) of 400 continuations each, each
sampling case tested alone against its target's exact joint.
"""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_dflare.lossless import (
    Draw,
    RandomDraw,
    case_draw,
    greedy_case,
    pooled_sampling_case,
    proposal_group,
    run_greedy_case,
    run_sampling_case,
    sampling_case,
)

FUZZ_EXAMPLES = int(os.environ.get("DFLARE_FUZZ_EXAMPLES", "120"))
SAMPLING_EXAMPLES = int(os.environ.get("DFLARE_FUZZ_SAMPLING_EXAMPLES", "8"))


class HypothesisDraw(Draw):
    """The case generators' choices, drawn by hypothesis."""

    def __init__(self, draw):
        self.draw = draw

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def integer(self, low, high):
        return self.draw(st.integers(low, high))

    def integers(self, low, high, min_size, max_size):
        return self.draw(st.lists(st.integers(low, high), min_size=min_size, max_size=max_size))


@st.composite
def greedy_cases(draw):
    return greedy_case(HypothesisDraw(draw))


@st.composite
def sampling_cases(draw):
    return sampling_case(HypothesisDraw(draw))


def fixed_cases(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def test_dflare_greedy_equals_plain_greedy():
    """Every case identical to plain greedy; enough cases really ran, and a tenth of them at least
    accepted drafts (fewer target forwards than new tokens), so acceptance paths are covered."""
    results = []

    @fixed_cases(FUZZ_EXAMPLES)
    @given(case=greedy_cases())
    def check(case):
        results.append(run_greedy_case(case))

    check()
    assert len(results) >= FUZZ_EXAMPLES
    assert sum(r.accepted for r in results) >= len(results) // 10, [r.accepted for r in results]


def test_dflare_sampling_follows_the_target_distribution():
    """Each case's 400 continuations pass a chi-square test against the exact joint (the cases are
    fixed, so they pass or fail the same way on every run), and drafted tokens were really accepted
    somewhere, so the pairs the drafts fill are tested."""
    results = []

    @fixed_cases(SAMPLING_EXAMPLES)
    @given(case=sampling_cases())
    def check(case):
        pvalue, accepted = run_sampling_case(case, n=400)
        assert pvalue > 1e-4, (f"DFlare samples do not follow the target distribution (p={pvalue:.2e})", case)
        results.append(accepted)

    check()
    assert len(results) >= SAMPLING_EXAMPLES
    assert max(results) > 100, results  # in some case more than one continuation in four had a draft accepted


def test_command_cases_are_a_function_of_seed_and_index():
    """``--replay KIND:INDEX`` rebuilds exactly the case the run met: the draws depend on the seed,
    the kind and the index alone, and every proposal group of the pooled sampling test occurs."""
    assert greedy_case(case_draw("greedy", 7, 3)) == greedy_case(case_draw("greedy", 7, 3))
    assert greedy_case(case_draw("greedy", 7, 3)) != greedy_case(case_draw("greedy", 8, 3))
    pooled = [pooled_sampling_case(case_draw("sampling", 7, i)) for i in range(60)]
    assert pooled[5] == pooled_sampling_case(case_draw("sampling", 7, 5))
    assert {proposal_group(case) for case in pooled} == {"stock", "custom/sample", "custom/argmax"}
    assert {case["config"] for case in pooled} == {0, 1, 2, 3}
    assert isinstance(case_draw("greedy", 1, 1), RandomDraw)


def test_check_lossless_command_runs_prints_its_seed_first_and_a_replay_line_per_failure(capsys, monkeypatch):
    import argparse

    import modeling_dflare.lossless as lossless

    parser = argparse.ArgumentParser()
    lossless.add_arguments(parser)
    args = parser.parse_args(["--greedy", "3", "--sampling", "60", "--continuations", "4", "--seed", "5"])
    monkeypatch.setattr(lossless, "MIN_POOL", 50)  # 60 cases: the pools of each configuration are tested
    threads = torch.get_num_threads()
    try:
        assert lossless.run(args) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].startswith("check-lossless: seed 5")
        assert "3/3 greedy cases identical" in out and "60/60 sampling cases (240 continuations" in out and "0 failure(s)" in out
        assert "p = " in out and "FAIL" not in out
        assert lossless.run(parser.parse_args(["--seed", "5", "--replay", "greedy:1"])) == 0
        out = capsys.readouterr().out
        assert f"greedy case 1: {greedy_case(case_draw('greedy', 5, 1))}" in out and "identical to plain greedy" in out

        real = lossless.run_greedy_case
        monkeypatch.setattr(lossless, "run_greedy_case", lambda case: real(dict(case, prompt=[])))  # an empty prompt: a crash
        args = parser.parse_args(["--greedy", "2", "--sampling", "0", "--seed", "5"])
        assert lossless.run(args) == 1
        out = capsys.readouterr().out
        assert "FAIL greedy case 0" in out and "replay: dflare check-lossless --seed 5 --replay greedy:0" in out
        assert "2 failure(s)" in out
    finally:
        torch.set_num_threads(threads)
