"""Checkpoints that survive SIGKILL and a full disk: written under a temporary name, then renamed."""

import json
import os
import shutil
from pathlib import Path


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-N`` folders only: ``tmp-*`` ones are unfinished)."""
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, checkpoint_dir: Path, state: dict, keep: int = 2) -> Path:
    """Write to ``tmp-step-N`` then rename: a crash or a full disk never replaces a good checkpoint."""
    final = checkpoint_dir / f"step-{state['step']}"
    tmp = checkpoint_dir / f"tmp-step-{state['step']}"
    # Several processes write into one folder (each its own RNG state): only the main one clears it,
    # and it renames the folder only once every process has finished writing.
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted((p for p in checkpoint_dir.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
