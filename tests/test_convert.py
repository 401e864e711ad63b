"""``dflare convert``: z-lab DFlash and AngelSlim DFlare checkpoints in, z-lab DFlash out.

No published weights can be downloaded here, so the sources are synthetic checkpoints written with the
exact tensor names and config fields of the reference code (z-lab ``dflash/model.py``, AngelSlim
``qwen_dflare.py`` and ``configs/qwen3_dflare.json``). A converted draft must load, generate exactly
what the target alone generates, and account for every source tensor.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import modeling_dflare  # noqa: F401  (registers the model type and the generate() hook)
import dflare_cli
from modeling_dflare import DFlareConfig, DFlareModel
from modeling_dflare.convert import ConversionError, convert, export_zlab_dflash

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, TARGET_LAYERS = 32, 4, 2, 8, 64, 100, 4
LAYER_TENSORS = {
    "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
    "self_attn.q_norm.weight": (HEAD_DIM,),
    "self_attn.k_norm.weight": (HEAD_DIM,),
    "mlp.gate_proj.weight": (FFN, HIDDEN),
    "mlp.up_proj.weight": (FFN, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, FFN),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=TARGET_LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         initializer_range=0.15, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def qwen3_draft_config(architecture: str, num_layers: int, target_layer_ids: list[int]) -> dict:
    """A config.json as the reference trainers write it: Qwen3 fields plus the DFlash ones in dflash_config."""
    return {
        "architectures": [architecture],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "block_size": 4,
        "dflash_config": {"mask_token_id": 3, "target_layer_ids": target_layer_ids},
        "dtype": "bfloat16",
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 256,
        "max_window_layers": num_layers,
        "model_type": "qwen3",
        "num_attention_heads": HEADS,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": KV_HEADS,
        "num_target_layers": TARGET_LAYERS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }


def _random(shape, generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights: around 1, like trained ones
        return (1 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.15).to(torch.bfloat16)


def write_checkpoint(folder, config: dict, tensors: dict[str, tuple]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    state = {key: _random(shape, generator) for key, shape in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


def zlab_tensors(num_layers: int, num_target: int) -> dict[str, tuple]:
    tensors = {"fc.weight": (HIDDEN, num_target * HIDDEN), "hidden_norm.weight": (HIDDEN,), "norm.weight": (HIDDEN,)}
    for layer in range(num_layers):
        tensors.update({f"layers.{layer}.{name}": shape for name, shape in LAYER_TENSORS.items()})
    return tensors


def angelslim_tensors(num_layers: int, num_target: int) -> dict[str, tuple]:
    tensors = {"layer_fusion_weights": (num_layers, num_target), "hidden_norm.weight": (HIDDEN,), "norm.weight": (HIDDEN,)}
    for layer in range(num_layers):
        tensors.update({f"layers.{layer}.{name}": shape for name, shape in LAYER_TENSORS.items()})
        tensors[f"layers.{layer}.self_attn.k_proj_target.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        tensors[f"layers.{layer}.self_attn.v_proj_target.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
    return tensors


@pytest.fixture
def zlab_source(tmp_path):
    ids = [0, 1, 2]
    state = write_checkpoint(tmp_path / "zlab", qwen3_draft_config("DFlashDraftModel", 2, ids), zlab_tensors(2, len(ids)))
    return tmp_path / "zlab", state


@pytest.fixture
def angelslim_source(tmp_path):
    ids = [0, 1, 2, 3]
    config = qwen3_draft_config("QwenDFlareDraftModel", 3, ids)
    del config["auto_map"]
    config.update(num_anchors=512, loss_decay_gamma=7.0, attention_backend="flex_attention")
    state = write_checkpoint(tmp_path / "angelslim", config, angelslim_tensors(3, len(ids)))
    return tmp_path / "angelslim", state


def assert_lossless(target, draft, seed: int = 0):
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        plain = target.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assisted = target.generate(prompt, assistant_model=draft, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(plain, assisted)
    assert draft.dflare_stats.cycles > 0, "the draft was never asked for candidates"


def assert_accounted(report, state, out):
    assert set(report.mapped) | set(report.ignored) == set(state), "a source tensor was neither mapped nor reported"
    converted = load_file(str(out / "model.safetensors"))
    for source_key, key in report.mapped.items():
        assert torch.equal(converted[key], state[source_key]), key


def test_zlab_dflash_converts_to_shared_fusion_and_generates_losslessly(zlab_source, target, tmp_path):
    src, state = zlab_source
    out = tmp_path / "converted"
    report = convert(src, out, "zlab-dflash")
    assert_accounted(report, state, out)
    draft = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    config = draft.config
    assert (config.fusion, config.target_layer_ids, config.block_size, config.mask_token_id) == ("shared", [0, 1, 2], 4, 3)
    assert config.num_target_hidden_layers == TARGET_LAYERS and config.rope_parameters["rope_theta"] == 1000000
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "configuration_dflare.py", "modeling_dflare.py"}
    assert_lossless(target, draft)


def test_angelslim_dflare_converts_to_layerwise_fusion_and_generates_losslessly(angelslim_source, target, tmp_path):
    src, state = angelslim_source
    out = tmp_path / "converted"
    report = convert(src, out, "angelslim-dflare")
    assert_accounted(report, state, out)
    draft = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert draft.config.fusion == "layerwise" and draft.config.num_hidden_layers == 3
    assert draft.layer_fusion_weights.shape == (3, 4)
    assert torch.equal(draft.layers[2].self_attn.k_proj_target.weight.to(torch.bfloat16), state["layers.2.self_attn.k_proj_target.weight"])
    assert_lossless(target, draft, seed=1)


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch-bin"])
def test_sharded_and_bin_sources_convert(tmp_path, layout):
    src = tmp_path / "src"
    state = write_checkpoint(src, qwen3_draft_config("DFlashDraftModel", 2, [1, 2]), zlab_tensors(2, 2))
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    if layout == "pytorch-bin":
        torch.save(state, src / "pytorch_model.bin")
    else:
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
        for name, names in shards.items():
            save_file({k: state[k] for k in names}, str(src / name))
        weight_map = {k: name for name, names in shards.items() for k in names}
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    report = convert(src, tmp_path / "out", "zlab-dflash")
    assert_accounted(report, state, tmp_path / "out")


def test_recomputed_rotary_buffer_is_reported_not_loaded(tmp_path):
    tensors = zlab_tensors(1, 2) | {"rotary_emb.inv_freq": (HEAD_DIM // 2,)}
    state = write_checkpoint(tmp_path / "src", qwen3_draft_config("DFlashDraftModel", 1, [1, 2]), tensors)
    report = convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")
    assert report.ignored == ["rotary_emb.inv_freq"]
    assert_accounted(report, state, tmp_path / "out")


@pytest.mark.parametrize("extra", ["layers.0.self_attn.attention_sink_bias", "candidate_selector.hidden_projection.weight"])
def test_unknown_source_tensor_raises_instead_of_being_dropped(tmp_path, extra):
    tensors = zlab_tensors(1, 2) | {extra: (HEADS,)}
    write_checkpoint(tmp_path / "src", qwen3_draft_config("DFlashDraftModel", 1, [1, 2]), tensors)
    with pytest.raises(ConversionError, match="would be dropped") as error:
        convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")
    assert extra in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_source_tensor_raises(tmp_path):
    tensors = zlab_tensors(2, 2)
    del tensors["layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path / "src", qwen3_draft_config("DFlashDraftModel", 2, [1, 2]), tensors)
    with pytest.raises(ConversionError, match="layers.1.mlp.up_proj.weight"):
        convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")


def test_shape_that_disagrees_with_the_config_raises(tmp_path):
    tensors = zlab_tensors(1, 2) | {"fc.weight": (HIDDEN, 3 * HIDDEN)}  # 3 target layers, config names 2
    write_checkpoint(tmp_path / "src", qwen3_draft_config("DFlashDraftModel", 1, [1, 2]), tensors)
    with pytest.raises(ConversionError, match="fc.weight"):
        convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")


def test_wrong_format_source_raises_a_clear_error(zlab_source, angelslim_source, tmp_path):
    with pytest.raises(ConversionError, match="looks like a z-lab DFlash checkpoint.*--from zlab-dflash"):
        convert(zlab_source[0], tmp_path / "a", "angelslim-dflare")
    with pytest.raises(ConversionError, match="looks like an AngelSlim DFlare checkpoint.*--from angelslim-dflare"):
        convert(angelslim_source[0], tmp_path / "b", "zlab-dflash")
    ours = tmp_path / "ours"
    DFlareModel(DFlareConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
                             num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_target_hidden_layers=4)).save_pretrained(ours)
    with pytest.raises(ConversionError, match="already a modeling_dflare draft"):
        convert(ours, tmp_path / "c", "zlab-dflash")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "d", "zlab-dflash")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}, "non-full attention"),
        ({"architectures": ["DFlash2DraftModel"]}, "DFlash 2"),
        ({"dflash_config": {"mask_token_id": 3, "target_layer_ids": [1, 2], "use_swa": True}}, "sliding-window"),
        ({"dflash_config": {"mask_token_id": 3, "target_layer_ids": [1, 2], "input_embedding_scale": 2.0}}, "input_embedding_scale"),
        ({"dflash_config": {"mask_token_id": 3}}, "target_layer_ids"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_source_features_raise(tmp_path, change, message):
    config = qwen3_draft_config("DFlashDraftModel", 2, [1, 2]) | change
    write_checkpoint(tmp_path / "src", config, zlab_tensors(2, 2))
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_shard_names_outside_the_source_folder_are_refused(tmp_path, name, capsys):
    """A foreign ``model.safetensors.index.json`` naming a file outside its folder (``..`` or an
    absolute path) is refused in one line, naming the shard; the outside file is never read."""
    src = tmp_path / "src"
    state = write_checkpoint(src, qwen3_draft_config("DFlashDraftModel", 2, [1, 2]), zlab_tensors(2, 2))
    (src / "model.safetensors").rename(tmp_path / "outside.safetensors")  # a complete checkpoint, but outside
    name = str(tmp_path / "outside.safetensors") if name == "ABSOLUTE" else name
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(state, name)}))
    with pytest.raises(ConversionError, match="outside the checkpoint folder") as error:
        convert(src, tmp_path / "out", "zlab-dflash")
    assert repr(name) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="outside the checkpoint folder"):
        dflare_cli.main(["convert", "--from", "zlab-dflash", str(src), str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "field, value",
    [("num_key_value_heads", 0), ("num_attention_heads", 0), ("hidden_size", -32), ("vocab_size", 10**12),
     ("num_hidden_layers", "2"), ("intermediate_size", 2**40), ("head_dim", 0), ("block_size", 1)],
)
def test_source_config_sizes_out_of_range_are_refused_before_any_weight_is_read(tmp_path, monkeypatch, field, value):
    """Every size of a foreign config.json is range-checked first: a zero head count is a one-line
    ConversionError naming the field and value (not a ZeroDivisionError, nor a silent fallback to
    another count), and no weight file is read before it."""
    import modeling_dflare.convert as convert_module

    config = qwen3_draft_config("DFlashDraftModel", 2, [1, 2])
    if field == "num_attention_heads":
        del config["head_dim"]  # the head size would be hidden_size // num_attention_heads
    config[field] = value
    write_checkpoint(tmp_path / "src", config, zlab_tensors(2, 2))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the config's sizes were checked")

    monkeypatch.setattr(convert_module, "read_state_dict", no_weights)
    with pytest.raises(ConversionError) as error:
        convert(tmp_path / "src", tmp_path / "out", "zlab-dflash")
    message = str(error.value)
    assert f"{field}={value!r}" in message and "expected an integer in [" in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def test_declared_torch_floor_has_a_safe_weights_only_load():
    """``.bin`` sources load with ``torch.load(weights_only=True)``, which torch before 2.6 lets a crafted
    file bypass: the declared range must start at 2.6 (its upper bound stays what was tested)."""
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    lines = [line.strip() for line in setup["options"]["install_requires"].splitlines()]
    torch_requirement = next(Requirement(line) for line in lines if line.startswith("torch"))
    assert "2.5.1" not in torch_requirement.specifier and "2.4.0" not in torch_requirement.specifier
    assert "2.6.0" in torch_requirement.specifier and torch.__version__.split("+")[0] in torch_requirement.specifier


def _shared_draft(tmp_path, target):
    torch.manual_seed(3)
    config = DFlareConfig.from_target_config(target.config, num_hidden_layers=2, fusion="shared", block_size=4, mask_token_id=5)
    draft = DFlareModel(config).eval()
    draft.save_pretrained(tmp_path / "ours")
    return draft


def test_export_to_zlab_dflash_round_trips(tmp_path, target):
    draft = _shared_draft(tmp_path, target)
    export_zlab_dflash(tmp_path / "ours", tmp_path / "zlab")
    exported = json.loads((tmp_path / "zlab" / "config.json").read_text())
    assert exported["architectures"] == ["DFlashDraftModel"] and exported["model_type"] == "qwen3"
    assert exported["dflash_config"] == {"mask_token_id": 5, "target_layer_ids": draft.config.target_layer_ids}
    assert exported["block_size"] == 4 and exported["num_target_layers"] == TARGET_LAYERS
    weights = load_file(str(tmp_path / "zlab" / "model.safetensors"))
    assert set(weights) == set(zlab_tensors(2, len(draft.config.target_layer_ids)))

    report = convert(tmp_path / "zlab", tmp_path / "back", "zlab-dflash")
    assert not report.ignored
    back = AutoModel.from_pretrained(tmp_path / "back", trust_remote_code=True).eval()
    original = draft.state_dict()
    assert set(back.state_dict()) == set(original)
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    for field in ("fusion", "target_layer_ids", "block_size", "mask_token_id", "num_target_hidden_layers", "rope_parameters",
                  "num_hidden_layers", "head_dim", "rms_norm_eps"):
        assert getattr(back.config, field) == getattr(draft.config, field), field
    assert_lossless(target, back, seed=2)


def test_export_of_layerwise_draft_explains_what_engines_cannot_load(tmp_path, target):
    config = DFlareConfig.from_target_config(target.config, num_hidden_layers=2, fusion="layerwise", block_size=4)
    DFlareModel(config).save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match="layer-wise fusion") as error:
        export_zlab_dflash(tmp_path / "ours", tmp_path / "zlab")
    assert "vLLM and SGLang" in str(error.value)
    assert not (tmp_path / "zlab").exists()


def test_export_of_reduced_vocabulary_needs_explicit_consent(tmp_path, target):
    config = DFlareConfig.from_target_config(target.config, num_hidden_layers=1, fusion="shared", block_size=4, draft_vocab_size=50)
    DFlareModel(config).save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match="--drop-draft-vocab"):
        export_zlab_dflash(tmp_path / "ours", tmp_path / "zlab")
    report = export_zlab_dflash(tmp_path / "ours", tmp_path / "zlab2", drop_draft_vocab=True)
    assert report.ignored == ["draft_vocab_ids"]
    assert "draft_vocab_ids" not in load_file(str(tmp_path / "zlab2" / "model.safetensors"))


def test_cli_convert_and_export(zlab_source, tmp_path, capsys):
    src, _ = zlab_source
    assert dflare_cli.main(["convert", "--from", "zlab-dflash", str(src), str(tmp_path / "ours")]) == 0
    assert dflare_cli.main(["convert", "--to", "zlab-dflash", str(tmp_path / "ours"), str(tmp_path / "exported")]) == 0
    assert "tensors mapped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a angelslim-dflare checkpoint"):
        dflare_cli.main(["convert", "--from", "angelslim-dflare", str(src), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not empty"):
        dflare_cli.main(["convert", "--from", "zlab-dflash", str(src), str(tmp_path / "ours")])


# ----------------------------------------------------------------------------------------------
# Numerical check against the method as the papers define it, written independently of our model
# ----------------------------------------------------------------------------------------------


def _rms(x, weight, eps=1e-6):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x, positions, theta):
    """x [n, heads, head_dim] rotated by the half-split (neox) convention at ``positions`` [n]."""
    inv = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.cat([positions[:, None] * inv] * 2, dim=-1)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def reference_block(state, fusion, noise, context, positions, theta):
    """Draft hidden states [B, H] for block ``noise`` [B, H] given target layers ``context`` [C, T*H]."""
    s = {k: v.float() for k, v in state.items()}
    num_layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("layers."))
    stacked = context.view(context.shape[0], -1, HIDDEN)
    x, ctx_len = noise, context.shape[0]
    for d in range(num_layers):
        p = lambda name: s[f"layers.{d}.{name}"]  # noqa: E731
        if fusion == "shared":  # DFlash: one fc projection of the concatenation, shared K/V projections
            ctx, k_ctx, v_ctx = _rms(context @ s["fc.weight"].T, s["hidden_norm.weight"]), p("self_attn.k_proj.weight"), p("self_attn.v_proj.weight")
        else:  # DFlare: per-layer softmax mix of the target layers, separate context K/V projections
            mix = torch.softmax(s["layer_fusion_weights"][d], dim=-1)
            ctx = _rms((stacked * mix[None, :, None]).sum(1), s["hidden_norm.weight"])
            k_ctx, v_ctx = p("self_attn.k_proj_target.weight"), p("self_attn.v_proj_target.weight")
        h = _rms(x, p("input_layernorm.weight"))
        q = _rms((h @ p("self_attn.q_proj.weight").T).view(-1, HEADS, HEAD_DIM), p("self_attn.q_norm.weight"))
        k = torch.cat([ctx @ k_ctx.T, h @ p("self_attn.k_proj.weight").T]).view(-1, KV_HEADS, HEAD_DIM)
        v = torch.cat([ctx @ v_ctx.T, h @ p("self_attn.v_proj.weight").T]).view(-1, KV_HEADS, HEAD_DIM)
        k = _rope(_rms(k, p("self_attn.k_norm.weight")), positions, theta)
        q = _rope(q, positions[ctx_len:], theta)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5, dim=-1)  # no mask: all context + whole block
        x = x + torch.einsum("hqk,khd->qhd", weights, v).reshape(x.shape[0], -1) @ p("self_attn.o_proj.weight").T
        h = _rms(x, p("post_attention_layernorm.weight"))
        x = x + (torch.nn.functional.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
    return _rms(x, s["norm.weight"])


@pytest.mark.parametrize("source", ["zlab", "angelslim"])
def test_converted_draft_computes_what_the_source_format_defines(source, zlab_source, angelslim_source, tmp_path):
    src, state = zlab_source if source == "zlab" else angelslim_source
    fusion = "shared" if source == "zlab" else "layerwise"
    convert(src, tmp_path / "out", "zlab-dflash" if source == "zlab" else "angelslim-dflare")
    # Built from the config, then loaded: this checks what the converted tensors compute, apart from how
    # from_pretrained restores buffers (see test_hub.test_loaded_draft_has_its_rotary_frequencies).
    draft = DFlareModel(DFlareConfig.from_pretrained(tmp_path / "out")).eval()
    draft.load_state_dict({k: v.float() for k, v in load_file(str(tmp_path / "out" / "model.safetensors")).items()})
    generator = torch.Generator().manual_seed(11)
    num_target = len(draft.config.target_layer_ids)
    context, noise = torch.randn(6, num_target * HIDDEN, generator=generator), torch.randn(4, HIDDEN, generator=generator)
    positions = torch.arange(10, dtype=torch.float32)
    expected = reference_block(state, fusion, noise, context, positions, theta=1000000.0)
    with torch.no_grad():
        got = draft(noise_embeds=noise[None], context_hidden_states=context[None], position_ids=torch.arange(10)[None]).last_hidden_state[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
