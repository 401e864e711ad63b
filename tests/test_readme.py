"""The README's code, run exactly as printed, from a folder other than the repository root."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_block(code: str, folder: Path) -> tuple[subprocess.CompletedProcess, float]:
    script = folder / "snippet.py"
    script.write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    return result, time.perf_counter() - start


def test_readme_has_the_offline_and_hub_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert "load_default" in blocks[0] and "shipped_draft" in blocks[0]
    assert "from_pretrained(\"HuggingFaceTB/SmolLM2-135M-Instruct\"" in blocks[1]


@pytest.mark.slow
def test_offline_snippet_runs_from_another_folder(tmp_path):
    result, _ = run_block(python_blocks()[0], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    tau = float(last.split()[-1])
    assert tau >= 1.0 and len(result.stdout.strip()) > 20


def test_hub_snippet_fails_fast_and_only_for_the_network_offline(tmp_path):
    """Offline, the Hub snippet can only fail at its first download, quickly, with the offline error
    (no syntax or name error hides behind it, and no 49 s connection wait)."""
    result, seconds = run_block(python_blocks()[1], tmp_path)
    assert result.returncode != 0
    assert "offline" in result.stderr.lower() or "HF_HUB_OFFLINE" in result.stderr, result.stderr[-2000:]
    assert "NameError" not in result.stderr and "SyntaxError" not in result.stderr
    assert seconds < 45, seconds
