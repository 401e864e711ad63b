"""The ``dflare`` command as a newcomer meets it: fast help, one-line errors, nothing left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def dflare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dflare_cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_help_does_not_import_torch():
    """``dflare --help`` lists the commands without loading torch or transformers (seconds otherwise)."""
    code = "import sys, dflare_cli\ntry:\n    dflare_cli.main(['--help'])\nexcept SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'modeling_dflare') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert "regenerate" in result.stdout and "bench" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dflare ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["regenerate", "--target", "no/such/dir", "--output-dir", "out"], ["no/such/dir", "no such file or folder"]),
        (["regenerate", "--target", "./missing", "--output-dir", "out"], ["./missing", "no such file or folder"]),
        (["regenerate", "--data", "nope.jsonl", "--output-dir", "out"], ["nope.jsonl", "does not exist", "'codeio'"]),
        (["regenerate", "--worker", "2/2", "--output-dir", "out"], ["--worker '2/2'", "expected K/N"]),
        (["convert", "--to", "zlab-dflash", "no/such/dir", "out"], ["no/such/dir", "no such folder"]),
        (["train", "--output-dir", "d", "--data", "missing.jsonl"], ["--data", "missing.jsonl", "does not exist"]),
        (["train", "--output-dir", "d", "--data", "sharegpt", "--init-from", "nowhere"], ["--init-from", "nowhere"]),
        (["train", "--output-dir", "d", "--data", "sharegpt", "--grow-layers", "2"], ["--grow-layers 2", "--init-from"]),
        (["bench", "--draft", "nowhere"], ["nowhere", "no draft"]),
        (["evaluate", "nowhere", "--heldout", "x"], ["nowhere", "no config.json"]),
        (["regenerate", "--data", "gsm_symbolic", "--output-dir", "out"], ["gsm_symbolic", "'codeio'", "'gsm-symbolic'"]),
        (["push", "nowhere", "--repo-id", "bad//id", "--dry-run", "out"], ["bad//id"]),
        (["cache", "no/cache"], ["no/cache", "not a folder"]),
    ],
)
def test_bad_arguments_fail_in_one_line_and_leave_nothing(tmp_path, argv, needles):
    result = dflare(*argv, cwd=tmp_path)
    _one_line_error(result, *needles)
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-made output or work folder


def test_debug_shows_the_traceback(tmp_path):
    result = dflare("--debug", "train", "--output-dir", "d", "--data", "missing.jsonl", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_data_folder_with_files_it_would_not_read_is_refused(tmp_path):
    """A folder passed as --data is read as regenerated answers (part-*.jsonl.gz, shard-*.jsonl):
    a conversation file under another name would be skipped in silence, so training refuses, names
    it and says how to pass it; an empty folder is refused too. Nothing is created."""
    import gzip
    import json

    record = json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    folder = tmp_path / "answers"
    folder.mkdir()
    with gzip.open(folder / "part-00000.jsonl.gz", "wt") as handle:
        handle.write(record + "\n")
    with gzip.open(folder / "sampled-00000.jsonl.gz", "wt") as handle:
        handle.write(record + "\n")
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())

    result = dflare("train", "--output-dir", "d", "--data", "answers", cwd=tmp_path)
    _one_line_error(result, "answers", "sampled-00000.jsonl.gz", "would not be read", "part-NNNNN.jsonl.gz")
    result = dflare("train", "--output-dir", "d", "--data", "empty", cwd=tmp_path)
    _one_line_error(result, "empty", "holds no regenerated answers")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
