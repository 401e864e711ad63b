"""``save_pretrained`` round trip, including a clean process where ``modeling_dflare`` is not importable.

The clean process proves the two Hub files are self-contained: the draft is loaded only through
``trust_remote_code`` from the saved folder, and ``generate(assistant_model=draft)`` must pick our
generator (the hook comes from the remote copy of ``modeling_dflare.py``) and equal plain generate.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import cached_target
from safetensors import safe_open
from transformers import AutoConfig, AutoModel

from modeling_dflare import DFlareModel
from modeling_dflare.testing import greedy, make_draft, make_oracle, random_prompt

CODE_FILES = ("configuration_dflare.py", "modeling_dflare.py", "generation_dflare.py", "cpu_kernels_dflare.py", "verify_dflare.py")
HUB_FILES = {"config.json", "model.safetensors", *CODE_FILES}

# Runs in a fresh interpreter: blocks `modeling_dflare` (installed editable, so PYTHONPATH alone
# would not hide it), loads target and draft from folders, compares with plain generate.
CLEAN_PROCESS = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_dflare" or name.startswith("modeling_dflare."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import modeling_dflare  # noqa: F401
        raise SystemExit("modeling_dflare should not be importable here")
    except ImportError:
        pass

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    target_dir, results = sys.argv[1], {}
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = None
    prompt = torch.tensor([json.loads(sys.argv[2])])
    plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
    for draft_dir in sys.argv[3:]:
        draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True).eval()
        ours = target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=draft)
        stats = getattr(draft, "dflare_stats", None)
        stock = target.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=draft, speculation_type="dflash")
        results[draft_dir] = dict(
            module=type(draft).__module__,
            fusion=draft.config.fusion,
            ours=ours[0].tolist() == plain[0].tolist(),
            stock=stock[0].tolist() == plain[0].tolist(),
            cycles=None if stats is None else stats.cycles,
            stats_module=None if stats is None else type(stats).__module__,
            checksum=sum(float(p.double().sum()) for p in draft.parameters()),
        )
    print("RESULT" + json.dumps(results))
    """
)


def run_clean(tmp_path, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    workdir = tmp_path / "cwd"
    workdir.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS, *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def checksum(model) -> float:
    return sum(float(p.detach().double().sum()) for p in model.parameters())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama target and two drafts (DFlare and DFlash fusion) saved to folders."""
    root = tmp_path_factory.mktemp("saved")
    target = cached_target("llama")
    target.save_pretrained(root / "target")
    drafts = {}
    for fusion in ("layerwise", "shared"):
        draft = make_draft(target, fusion=fusion, block_size=4, seed=11)
        draft.save_pretrained(root / fusion)
        drafts[fusion] = draft
    return root, drafts


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_saved_folder_holds_only_the_hub_files_and_draft_weights(saved, fusion):
    root, drafts = saved
    folder = root / fusion
    assert {p.name for p in folder.iterdir()} == HUB_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dflare"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dflare.DFlareConfig",
        "AutoModel": "modeling_dflare.DFlareModel",
    }
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "embed" in k or "lm_head" in k], keys
    assert sum(f"layers.{i}." in k for k in keys for i in range(2)) > 0
    if fusion == "layerwise":
        assert "layer_fusion_weights" in keys and any("k_proj_target" in k for k in keys)
    else:
        assert "fc.weight" in keys and not any("k_proj_target" in k for k in keys)
    # The Hub files import nothing of ours but each other.
    for name in CODE_FILES:
        source = (folder / name).read_text()
        assert "from modeling_dflare" not in source and "import modeling_dflare" not in source


def test_clean_process_trust_remote_code_generate(saved, tmp_path):
    root, drafts = saved
    prompt = random_prompt(6, seed=4)
    results = run_clean(tmp_path, root / "target", json.dumps(prompt[0].tolist()), root / "layerwise", root / "shared")
    for fusion in ("layerwise", "shared"):
        result = results[str(root / fusion)]
        assert result["module"].startswith("transformers_modules."), result
        assert result["fusion"] == fusion
        assert result["ours"] and result["stock"], result
        # Our generator ran (its stats exist and come from the remote copy) and the weights loaded intact.
        assert result["cycles"] == 11 and result["stats_module"].startswith("transformers_modules."), result
        assert result["checksum"] == pytest.approx(checksum(drafts[fusion]), rel=1e-6)


@pytest.mark.parametrize("fusion", ["layerwise", "shared"])
def test_roundtrip_in_process(saved, fusion):
    root, drafts = saved
    loaded = AutoModel.from_pretrained(root / fusion)
    assert isinstance(loaded, DFlareModel)
    original = drafts[fusion].state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    remote = AutoModel.from_pretrained(root / fusion, trust_remote_code=True)
    assert checksum(remote) == pytest.approx(checksum(drafts[fusion]))
    assert AutoConfig.from_pretrained(root / fusion).to_dict()["target_layer_ids"] == drafts[fusion].config.target_layer_ids


def test_roundtrip_bf16_with_draft_vocab(tmp_path):
    """A bf16 draft with a reduced draft vocabulary (a persistent id buffer) survives the round trip."""
    target = cached_target("qwen3")
    prompt = random_prompt(5, seed=9)
    draft, _ = make_oracle(target, prompt, block_size=4, draft_vocab_size=60)
    draft = draft.to(torch.bfloat16)
    draft.draft_vocab_ids.copy_(torch.randperm(100)[:60])
    plain_draft = DFlareModel(draft.config).to(torch.bfloat16)
    plain_draft.load_state_dict(draft.state_dict())
    plain_draft.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.draft_vocab_ids, draft.draft_vocab_ids)
    expected = greedy(target, prompt, max_new_tokens=10)
    assert greedy(target, prompt, max_new_tokens=10, assistant_model=loaded).tolist() == expected.tolist()
