"""The CPU fast paths of :mod:`modeling_dflare.cpu_kernels_dflare`: the small-row kernels for the
target's verify forward (switching, packing, the autotuner and what it frees). Each agrees with the
stock kernel to float rounding; that generation stays identical on them is tested in
test_generation.py."""

import pytest
import torch


def test_small_row_linears_switch_plain_linears_only_and_restore_them():
    from torch import nn

    from modeling_dflare.cpu_kernels_dflare import SMALL_ROWS, small_row_linears

    class Subclassed(nn.Linear):  # e.g. a quantised or LoRA layer: its own forward must stay
        pass

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Subclassed(32, 32), nn.Linear(32, 8, bias=False))
    offloaded = nn.Linear(8, 8)
    offloaded.forward = lambda x: x  # what accelerate's offload hooks do
    model.append(offloaded)
    inputs = [torch.randn(1, rows, 16, generator=torch.Generator().manual_seed(rows)) for rows in (1, 2, 7, SMALL_ROWS, SMALL_ROWS + 1)]
    expected = [model(x) for x in inputs]
    with small_row_linears(model, "packed") as switched:
        assert switched == 2 and "forward" in model[0].__dict__ and "forward" in model[3].__dict__
        assert "forward" not in model[2].__dict__ and offloaded.forward(torch.ones(1)) == 1
        got = [model(x) for x in inputs]
    for x, want, have in zip(inputs, expected, got):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-5, rtol=1e-5), x.shape
    assert "forward" not in model[0].__dict__ and "forward" not in model[3].__dict__  # restored
    assert model(inputs[1]).equal(expected[1])


def test_small_row_linears_one_row_is_stock_except_for_a_wide_head(monkeypatch):
    """One row keeps the stock kernel (bit for bit), except a head-sized weight with 2+ threads,
    which runs as two rows (a threaded GEMM) and agrees to float rounding."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    monkeypatch.setattr(modeling, "WIDE_WEIGHT", 64 * 48)
    narrow, wide = nn.Linear(48, 16), nn.Linear(48, 64, bias=False)
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b, original=torch.Tensor.__matmul__: calls.append(b.shape) or original(a, b))
    try:
        torch.set_num_threads(2)
        with modeling.small_row_linears(nn.Sequential(narrow, wide), "packed"):
            assert narrow(x).equal(nn.functional.linear(x, narrow.weight, narrow.bias)) and calls == []
            got = wide(x)
            assert calls == [(48, 2)]  # the row, twice
            torch.set_num_threads(1)
            assert wide(x).equal(nn.functional.linear(x, wide.weight)) and len(calls) == 1
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (1, 1, 64) and torch.allclose(got, nn.functional.linear(x, wide.weight), atol=1e-5, rtol=1e-5)


def test_small_row_linears_pack_each_weight_once_and_follow_it(monkeypatch):
    """2+ rows run oneDNN's linear on a packed copy of the weight (bias included), made once per
    weight and remade after an in-place update; "matmul" runs W @ x.T and packs nothing; one row
    stays stock; an unknown kernel name is refused."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels are the CPU default and must be tested")
    layer = nn.Linear(48, 40)
    packs, calls = [], []
    monkeypatch.setattr(modeling, "packed_weight", lambda m, original=modeling.packed_weight: calls.append(m) or original(m))
    x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(1))
    one = x[:, :1]
    with modeling.small_row_linears(layer, "packed") as switched:
        assert switched == 1
        first, second = layer(x), layer(x)
        packs.append(modeling._PACKED[layer][1])
        assert layer(one).equal(nn.functional.linear(one, layer.weight, layer.bias)) and len(calls) == 2  # one row: stock
        with torch.no_grad():
            layer.weight.mul_(2)  # the version counter moves: the packed copy is remade
        third = layer(x)
        packs.append(modeling._PACKED[layer][1])
    assert len(calls) == 3 and packs[0] is not packs[1]
    assert first.equal(second) and first.shape == (1, 3, 40)
    with torch.no_grad():
        layer.weight.div_(2)
        want = nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(first, want, atol=1e-5, rtol=1e-5)
        layer.weight.mul_(2)
        assert torch.allclose(third, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    calls.clear()
    with modeling.small_row_linears(layer, "matmul"):
        got = layer(x)
    assert calls == [] and torch.allclose(got, third, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'fast'.*packed"):
        with modeling.small_row_linears(layer, "fast"):
            pass
    assert "forward" not in layer.__dict__


def test_auto_small_row_kernels_take_the_fastest_timed_kernel_per_layer_kind_and_row_count(monkeypatch):
    """``choose_small_row_kernels`` times every candidate on each kind of layer (weight shape, bias,
    layout) for each row count in TIMED_ROWS and keeps the fastest; counts between timed ones take
    the next timed count's choice, counts past the last its choice; the stock kernel stays unless
    another is MIN_GAIN faster. A fake clock that each kernel
    call advances by a set cost stands in for the machine."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels are the CPU default and must be tested")
    _require_rows_kernel(modeling)
    monkeypatch.setattr(modeling, "TIMED_ROWS", (1, 2, 4))
    now = [0.0]
    calls = []

    def cost(kernel, module, rows):
        wide = module.out_features == 64
        if rows == 1:
            return {"tworow": 1.0, "stock": 2.0}.get(kernel, 3.0) if wide else {"stock": 1.0}.get(kernel, 2.0)
        if rows == 2:
            return {"matmul": 1.0}.get(kernel, 2.0)
        return {"packed": 0.98, "stock": 1.0}.get(kernel, 2.0)  # under MIN_GAIN faster: the stock kernel stays

    def timed_kernel(kernel, module, flat, original=modeling._run_kernel):
        calls.append((kernel, module, flat.shape[0]))
        now[0] += cost(kernel, module, flat.shape[0])
        return original(kernel, module, flat)

    monkeypatch.setattr(modeling, "_run_kernel", timed_kernel)
    narrow, narrow_too, wide = nn.Linear(48, 16), nn.Linear(48, 16), nn.Linear(48, 64, bias=False)
    chosen = modeling.choose_small_row_kernels([narrow, wide, narrow_too], rounds=3, clock=lambda: now[0])
    assert set(chosen) == {((16, 48), True, True), ((64, 48), False, True)}
    for kernels, one in ((chosen[((16, 48), True, True)], "stock"), (chosen[((64, 48), False, True)], "tworow")):
        assert len(kernels) == modeling.SMALL_ROWS
        assert kernels[:4] == (one, "matmul", "stock", "stock") and set(kernels[4:]) == {"stock"}
    # each kind is timed over all its layers in a row; every candidate of every count once a round (+ a warm-up round)
    narrow_calls = [c for c in calls if c[1] in (narrow, narrow_too)]
    assert [c[1] for c in narrow_calls[:2]] == [narrow, narrow_too]
    # 2 layers x 4 rounds x (1 row: 5 candidates; 2, 4 rows: 4)
    assert len(narrow_calls) == 2 * 4 * (5 + 4 + 4)
    assert {c[0] for c in calls if c[2] > 1} == {"stock", "packed", "matmul", "rows"}
    # timing packed every weight; no count runs packed here, so no packed copy is kept
    assert not any(module in modeling._PACKED for module in (narrow, narrow_too, wide))


def test_auto_small_row_kernels_are_timed_once_per_model_and_thread_count_and_agree_with_stock(monkeypatch):
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    timings = []
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules, original=modeling.choose_small_row_kernels: timings.append(len(modules)) or original(modules, rounds=1)
    )
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 8, bias=False))
    inputs = [torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(rows)) for rows in (1, 2, 3, 9, 17, modeling.SMALL_ROWS + 1)]
    expected = [model(x) for x in inputs]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for _ in range(2):
            with modeling.small_row_linears(model) as switched:
                # layers the stock kernel suits at every row count stay unswitched
                assert switched == sum("forward" in layer.__dict__ for layer in model) <= 3
                got = [model(x) for x in inputs]
            for x, want, have in zip(inputs, expected, got):
                assert have.shape == want.shape and torch.allclose(have, want, atol=1e-5, rtol=1e-5), x.shape
        assert timings == [3]
        torch.set_num_threads(2)
        with modeling.small_row_linears(model):
            pass
        assert timings == [3, 3]  # another thread count: timed again
    finally:
        torch.set_num_threads(threads)
    assert all("forward" not in layer.__dict__ for layer in model)


def test_auto_small_row_kernels_leave_layers_the_stock_kernel_suits(monkeypatch):
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8))
    kernels = lambda first: tuple([first] + ["stock"] * (modeling.SMALL_ROWS - 1))  # noqa: E731
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules: {modeling._signature(model[0]): kernels("matmul"), modeling._signature(model[1]): kernels("stock")}
    )
    with modeling.small_row_linears(model) as switched:
        assert switched == 1 and "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        x = torch.randn(1, 1, 24)
        assert torch.allclose(model(x), nn.functional.linear(nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias), atol=1e-5)
    assert "forward" not in model[0].__dict__


def test_packed_copies_the_auto_choice_does_not_use_are_freed(monkeypatch):
    """After a fixed "packed" run packed every layer (the bench's cost curve), only the layers the
    timed choice runs packed keep their copy; the others pack again if ever needed."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    if not modeling.onednn_linear_available():
        pytest.fail("this torch build has no oneDNN linear: the packed small-row kernels must be tested")
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8))
    kernels = lambda last: tuple(["stock"] * (modeling.SMALL_ROWS - 1) + [last])  # noqa: E731
    monkeypatch.setattr(
        modeling, "choose_small_row_kernels", lambda modules: {modeling._signature(model[0]): kernels("packed"), modeling._signature(model[1]): kernels("matmul")}
    )
    x = torch.randn(1, 3, 24)
    with modeling.small_row_linears(model):  # the timed choice: packed for the first layer only
        model(torch.randn(1, modeling.SMALL_ROWS, 24))
    with modeling.small_row_linears(model, "packed"):
        expected = model(x)
    assert model[0] in modeling._PACKED and model[1] in modeling._PACKED
    assert modeling.free_unused_packed_weights(model) == 1
    assert model[0] in modeling._PACKED and model[1] not in modeling._PACKED
    with modeling.small_row_linears(model, "packed"):  # packs again when asked to
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert model[1] in modeling._PACKED


def _require_rows_kernel(modeling):
    if modeling.rows_kernel() is None:
        pytest.fail(
            "the 'rows' small-row kernel did not build here (see the INFO log of modeling_dflare.cpu_kernels_dflare): "
            "it needs a C++ compiler, ninja and AVX2 + FMA, which every test machine of this project has; it must be tested"
        )


@pytest.mark.parametrize("features", [576, 48, 37])
def test_rows_kernel_agrees_with_the_stock_kernel_for_any_row_count_and_shape(features):
    """The compiled "rows" kernel computes ``x @ W.T`` for groups of up to 8 rows, each weight row
    read once; any row count (groups of 8, then the rest), feature counts that are not a multiple of
    the vector width (masked tails), output counts that leave a remainder of the per-step rows."""
    import modeling_dflare.cpu_kernels_dflare as modeling

    _require_rows_kernel(modeling)
    generator = torch.Generator().manual_seed(features)
    for outputs in (1, 5, 193, 1536):
        weight = torch.randn(outputs, features, generator=generator)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 64):
            x = torch.randn(rows, features, generator=generator)
            got = modeling.rows_kernel().rows_linear(x, weight)
            want = torch.nn.functional.linear(x, weight)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-5), (outputs, rows)
    with pytest.raises(RuntimeError, match="float32"):
        modeling.rows_kernel().rows_linear(torch.ones(2, 8, dtype=torch.float64), torch.ones(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and W \[N, K\]"):
        modeling.rows_kernel().rows_linear(torch.ones(2, 8), torch.ones(3, 9))


class RowsSpy:
    """Stands in for the built kernel and counts the rows of each call it passes on."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def rows_linear(self, x, weight):
        self.calls.append(x.shape[0])
        return self.kernel.rows_linear(x, weight)


def test_rows_kernel_runs_the_layers_it_is_given_with_their_bias(monkeypatch):
    """``small_row_linears(model, "rows")`` switches every plain fp32 linear layer to the kernel for
    small row counts (bias added after), leaves larger calls to the stock kernel, and restores them."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    _require_rows_kernel(modeling)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 8, bias=False))
    inputs = [torch.randn(1, rows, 24, generator=torch.Generator().manual_seed(rows)) for rows in (1, 3, 8, 11, modeling.SMALL_ROWS + 1)]
    expected = [model(x) for x in inputs]
    spy = RowsSpy(modeling.rows_kernel())
    monkeypatch.setitem(modeling._ROWS_BUILT, "kernel", spy)
    with modeling.small_row_linears(model, "rows") as switched:
        assert switched == 2
        got = [model(x) for x in inputs]
    assert spy.calls == [1, 1, 3, 3, 8, 8, 11, 11]  # both layers, up to SMALL_ROWS rows
    for want, have in zip(expected, got):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-5, rtol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in model)


def test_without_the_rows_kernel_auto_times_the_others_and_rows_is_refused_clearly(monkeypatch):
    """Where the kernel cannot be built (no compiler, ``DFLARE_ROWS_KERNEL=0``), "auto" times the other
    kernels only and an explicit "rows" is refused with what it needs."""
    from torch import nn

    import modeling_dflare.cpu_kernels_dflare as modeling

    monkeypatch.setitem(modeling._ROWS_BUILT, "kernel", None)
    calls = []
    monkeypatch.setattr(modeling, "_run_kernel", lambda kernel, module, flat, original=modeling._run_kernel: calls.append(kernel) or original(kernel, module, flat))
    monkeypatch.setattr(modeling, "TIMED_ROWS", (1, 2))
    modeling.choose_small_row_kernels([nn.Linear(16, 8)], rounds=1)
    assert calls and "rows" not in calls
    with pytest.raises(RuntimeError, match="'rows'.*C\\+\\+ compiler.*DFLARE_ROWS_KERNEL=0.*'auto'"):
        with modeling.small_row_linears(nn.Linear(16, 8), "rows"):
            pass


def test_rows_kernel_is_not_built_when_turned_off_or_when_the_build_fails(monkeypatch, caplog, tmp_path):
    """``DFLARE_ROWS_KERNEL=0`` leaves it unbuilt; a failed build (here: the compiler call raising)
    gives None and one INFO line, never an error in generate."""
    import logging

    from torch.utils import cpp_extension

    import modeling_dflare.cpu_kernels_dflare as modeling

    monkeypatch.setattr(modeling, "_ROWS_BUILT", {})
    monkeypatch.setenv("DFLARE_ROWS_KERNEL", "0")
    assert modeling.rows_kernel() is None
    monkeypatch.setattr(modeling, "_ROWS_BUILT", {})
    monkeypatch.delenv("DFLARE_ROWS_KERNEL")
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))

    def failing(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load_inline", failing)
    with caplog.at_level(logging.INFO, logger="modeling_dflare.cpu_kernels_dflare"):
        assert modeling.rows_kernel() is None and modeling.rows_kernel() is None
    assert [r.getMessage() for r in caplog.records if "not available" in r.getMessage()] == [
        "the small-row verify kernel is not available here (OSError: no C++ compiler found)"
    ]


def test_rows_kernel_build_clears_only_a_stale_lock_of_its_own(monkeypatch, tmp_path):
    """A build lock older than STALE_BUILD_LOCK in the kernel's own build folder was left by a process
    that died while building (torch would wait for it forever): it is removed; a fresh one (another
    process building now) is left for torch to wait on."""
    import os
    import time

    from torch.utils import cpp_extension

    import modeling_dflare.cpu_kernels_dflare as modeling

    class Built:
        def available(self):
            return True

    seen = []
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", lambda name, **kwargs: seen.append((name, kwargs["build_directory"])) or Built())
    lock = tmp_path / modeling.rows_kernel_name() / "lock"
    lock.parent.mkdir()
    for age, kept in ((modeling.STALE_BUILD_LOCK + 60, False), (5, True)):
        lock.write_text("")
        os.utime(lock, (time.time() - age, time.time() - age))
        monkeypatch.setattr(modeling, "_ROWS_BUILT", {})
        assert isinstance(modeling.rows_kernel(), Built)
        assert lock.exists() == kept
    assert seen == [(modeling.rows_kernel_name(), str(lock.parent))] * 2


def test_rows_kernel_build_name_follows_source_torch_and_cpu(monkeypatch):
    """The build is named by the kernel's source, torch's version and the CPU's instruction sets, so a
    home folder shared by machines with other CPUs never loads code compiled for another one."""
    import modeling_dflare.cpu_kernels_dflare as modeling

    name = modeling.rows_kernel_name()
    assert name.startswith("dflare_rows_") and name == modeling.rows_kernel_name()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "fma3": True, "avx512_f": False})
    other = modeling.rows_kernel_name()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "fma3": True, "avx512_f": True})
    assert len({name, other, modeling.rows_kernel_name()}) == 3


# ----------------------------------------------------------------------------------------------
# The draft's head rows (draft_head) and the bf16 choice (bf16_is_native, fast_draft_dtype)
# ----------------------------------------------------------------------------------------------


def test_draft_uses_the_targets_own_head():
    """A draft has no LM head of its own: training and generation both read the target's output
    embedding (tied or not), so a tied target cannot meet an untied copy."""
    from modeling_dflare import DFlareConfig, DFlareModel
    from modeling_dflare.cpu_kernels_dflare import draft_head
    from modeling_dflare.testing import tiny_target

    target = tiny_target("gemma3", tie_word_embeddings=True)
    assert target.get_output_embeddings().weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    draft = DFlareModel(DFlareConfig.from_target_config(target.config, num_hidden_layers=1, block_size=4))
    assert not any(p.shape[0] == target.config.vocab_size for p in draft.parameters())

    rows, ids = draft_head(draft, target.get_output_embeddings().weight)
    assert ids is None and rows.data_ptr() == target.get_output_embeddings().weight.data_ptr()


def test_bf16_draft_ranks_with_a_bf16_copy_of_the_head_rows():
    """A bf16 draft next to an fp32 target proposes from a cached bf16 copy of its head rows (about
    9x faster on a CPU); the target's own head is untouched and the copy follows it when it changes."""
    from modeling_dflare import DFlareConfig, DFlareModel
    from modeling_dflare.cpu_kernels_dflare import draft_head
    from modeling_dflare.testing import tiny_target

    target = tiny_target("llama")
    head = target.get_output_embeddings().weight
    draft = DFlareModel(DFlareConfig.from_target_config(target.config, num_hidden_layers=1, block_size=4, draft_vocab_size=40))
    draft.to(torch.bfloat16)
    rows, ids = draft_head(draft, head)
    assert rows.dtype == torch.bfloat16 and head.dtype == torch.float32
    assert torch.equal(rows, head.detach()[ids].to(torch.bfloat16)) and ids.tolist() == list(range(40))
    assert draft_head(draft, head)[0] is rows  # cached
    with torch.no_grad():
        head.mul_(2.0)  # a changed head (in-place) is noticed
    assert torch.equal(draft_head(draft, head)[0], head.detach()[ids].to(torch.bfloat16))
    draft.to(torch.float32)
    assert draft_head(draft, head)[0].dtype == torch.float32


@pytest.mark.parametrize(
    "capabilities, native",
    [
        ({"avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_vl": True}, False),  # oneDNN would emulate bf16
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, True),
        ({"avx2": True, "amx_tile": True, "amx_bf16": True}, True),
        ({"architecture": "arm64", "neon": True, "bf16": True}, True),
        ({"avx2": True}, False),
    ],
)
def test_bf16_counts_as_native_only_where_the_cpu_has_bf16_instructions(monkeypatch, capabilities, native):
    """bf16 is chosen for CPU drafts, targets and training only on AVX512-BF16 / AMX / ARM BF16: oneDNN's
    own check says yes on plain AVX-512 too, where bf16 autocast ran 3.6x slower than fp32."""
    import modeling_dflare.cpu_kernels_dflare as modeling

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert modeling.bf16_is_native() is native
    assert modeling.fast_draft_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
