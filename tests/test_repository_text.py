"""The product speaks of itself: results belong to a draft version, a date and a machine.

No tracked text file (code, docs, data and model cards, scripts, tests) refers to how the work on it
was organised: no work-period numbers, no tracker issue numbers, no file named after either, and no
local run folder or machine path in the shipped model cards.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BINARY_SUFFIXES = {".gz", ".safetensors", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".pdf", ".pt", ".bin", ".gguf", ".whl", ".zip"}

# The word is spelt in two pieces so that this file passes its own check.
WORD = "ses" + "sion"
PROCESS_WORDS = re.compile(rf"\b{WORD}s?\b|\b{WORD}[-_ ]?\d+|\b(?:issues?|PR|pull request)\s*#?\d+", re.IGNORECASE)
# Third-party meanings of the word, as exact phrases (pytest fixture scopes, client classes).
ALLOWED_PHRASES = (f'scope="{WORD}"', "requests.Session", "InferenceSession")

NUMBERED_FILE_NAME = re.compile(WORD + r"|(?:^|[-_.])s\d{1,2}(?=[-_.])", re.IGNORECASE)

SHIPPED_CARDS = ("drafts/*/README.md", "hub_cards/*")
LOCAL_PATHS = re.compile(r"(?<![\w./-])runs/|(?<![\w.-])/(?:work|tmp|home|root|Users)/")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in out.split("\0") if name]


def text_lines(name: str) -> list[str]:
    """The file's lines, or nothing for a binary file, a link or a file missing from the work tree."""
    path = ROOT / name
    if path.suffix.lower() in BINARY_SUFFIXES or path.is_symlink() or not path.is_file():
        return []
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []
    return data.decode("utf-8", errors="replace").splitlines()


def matches(pattern: re.Pattern, names, allowed=()) -> list[str]:
    found = []
    for name in names:
        for number, line in enumerate(text_lines(name), start=1):
            for phrase in allowed:
                line = line.replace(phrase, "")
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()[:160]}")
    return found


def test_no_tracked_text_names_the_development_process():
    found = matches(PROCESS_WORDS, tracked_files(), ALLOWED_PHRASES)
    assert not found, "say which draft, date and machine instead:\n" + "\n".join(found)


def test_no_tracked_file_is_named_after_a_work_period():
    found = [name for name in tracked_files() if NUMBERED_FILE_NAME.search(Path(name).name)]
    assert not found, "name these files by draft and date:\n" + "\n".join(found)


def test_shipped_cards_name_no_local_run_folder_or_machine_path():
    cards = [name for name in tracked_files() if any(Path(name).match(glob) for glob in SHIPPED_CARDS)]
    assert any(name.startswith("drafts/") for name in cards) and any(name.startswith("hub_cards/") for name in cards), cards
    found = matches(LOCAL_PATHS, cards)
    assert not found, "a model card is read on the Hub, where these paths mean nothing:\n" + "\n".join(found)


def test_the_checks_catch_what_they_are_for():
    assert PROCESS_WORDS.search(f"measured in {WORD} 21") and PROCESS_WORDS.search(f"the {WORD}-20 bench")
    assert PROCESS_WORDS.search("the target of issue" + " 11") and PROCESS_WORDS.search("see Issue" + " #7")
    assert not PROCESS_WORDS.search(f'@pytest.fixture(scope="{WORD}")'.replace(ALLOWED_PHRASES[0], ""))
    assert not PROCESS_WORDS.search("an issue with 3 answers") and not PROCESS_WORDS.search("ids <prompt id>#turn2")
    # the numbered names are built in pieces, so this file holds none of what it forbids
    assert NUMBERED_FILE_NAME.search("bench-s" + "21-r20.md") and NUMBERED_FILE_NAME.search("s" + "20_fp8_eval.json")
    assert not NUMBERED_FILE_NAME.search("r20-2026-11-29-xeon.md") and not NUMBERED_FILE_NAME.search("gpu_check_qwen3-8b.json")
    assert LOCAL_PATHS.search("--output-dir runs/dflare-r20") and LOCAL_PATHS.search("`/work/main/drafts`")
    assert not LOCAL_PATHS.search("datasets/smollm2-sharegpt/train")
