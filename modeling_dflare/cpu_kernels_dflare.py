# Copyright 2026 the modeling_dflare authors. Licensed under the Apache License, Version 2.0.
"""CPU fast paths for DFlare drafting and verification; none of them changes the output.

* which dtype a draft runs fastest in on this machine (:func:`bf16_is_native`, :func:`fast_draft_dtype`);
* the draft's LM-head product in the layout CPU kernels like (:func:`head_logits`) and a cached,
  narrower copy of the head rows it proposes from (:func:`draft_head`);
* an int8 copy of the draft for CPUs (:func:`int8_draft`, :func:`draft_for_generation`);
* small-row kernels for the target's verify forward (:func:`small_row_linears`), with an
  autotuner that times them on the model's own layers; one of them (:func:`rows_kernel`) is a
  few lines of C++ compiled for this CPU on first use, where a compiler is at hand.

The draft only proposes and the target verifies every token, so these paths trade float rounding
in the draft's ranking for speed, never the generated text. Kernel measurements behind the
defaults are in the project's docs. Travels to the Hub with ``modeling_dflare.py``.
"""

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def bf16_is_native() -> bool:
    """Whether this machine's CPU runs bf16 matmuls natively (AVX512-BF16 / AMX on x86, BF16 on ARM).

    Read from the CPU's instruction sets (``torch.cpu.get_capabilities``), not from oneDNN's
    ``_is_mkldnn_bf16_supported``: oneDNN also says yes on a plain AVX-512 CPU, where it emulates
    bf16 and a SmolLM2 forward under bf16 autocast measured 3.6x *slower* than fp32 (Xeon with
    AVX512-BW but no AVX512-BF16, 1 thread: 124 vs 450 tokens/s over a 512-token prefill).

    CPU only: callers decide for CUDA devices themselves, so a CPU model on a machine that also has
    a GPU is not sent to bf16 on a CPU that would emulate it.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(name, False)) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    # Older torch (before get_capabilities): its private per-feature checks, x86 only.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def fast_draft_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a draft runs fastest in on ``device``: bf16 where it is native, else fp32.

    The draft only proposes, so its dtype never changes the output. On a 2-core AVX512-BF16 CPU the
    SmolLM2 draft's cycle costs about 10 ms in bf16 against 14 ms in fp32; a CPU without native
    bf16 would emulate it and run slower, hence fp32 there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and bf16_is_native() else torch.float32


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` for a few draft positions [..., hidden] and a large head [rows, hidden],
    in the form CPU kernels run fastest (measured on 7 positions x 16k rows, 2 threads):

    * as a 2-D product: a 3-D slice such as ``last_hidden_state[:, 1:]`` keeps the parent's batch
      stride, and with it bf16 falls off oneDNN onto a kernel about 8x slower (10.7 vs 1.4 ms);
    * fp32 on a CPU as ``(weight @ hidden.T).T`` (2.6 vs 9.4 ms), which spares MKL repacking the
      whole head for a handful of rows.

    Same values up to float rounding; the draft's logits only rank its own proposals.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.device.type == "cpu" and weight.dtype == torch.float32:
        logits = (weight @ flat.T).T
    else:
        logits = flat @ weight.T
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])


#: A lower-precision copy of the LM head rows is made for the draft only up to this size (bytes).
HEAD_COPY_LIMIT = 256 * 2**20


def draft_head(draft: "DFlareModel", head: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor | None]:
    """(LM head rows the draft proposes from, their token ids or None), cached on the draft per
    target head, so repeated ``generate`` calls do not gather the reduced-vocabulary rows again.

    The rows are kept in the draft's dtype when that is narrower than the head's and the copy is
    small (a bf16 draft next to an fp32 target): the draft's logits only rank its own proposals,
    the target verifies every one, and on a CPU the bf16 product runs about 9x faster (here 1.0 vs
    9.3 ms for 7 positions x 16k rows), which is half of the draft's time per cycle.
    """
    ids = draft.draft_vocab_ids
    dtype = draft.dtype if draft.dtype.itemsize < head.dtype.itemsize else head.dtype
    rows = head.shape[0] if ids is None else ids.numel()
    if rows * head.shape[1] * dtype.itemsize > HEAD_COPY_LIMIT:
        dtype = head.dtype
    if ids is None and dtype == head.dtype:
        return head.detach(), None
    key = (head.data_ptr(), head.device, head.dtype, tuple(head.shape), dtype, _version(head))
    key += (ids.data_ptr(), _version(ids)) if ids is not None else ()
    cached = getattr(draft, "_dflare_head_cache", None)
    if cached is None or cached[0] != key:
        weight = head.detach() if ids is None else head.detach()[ids.to(head.device)]
        cached = (key, weight.to(dtype), None if ids is None else ids.to(head.device))
        draft._dflare_head_cache = cached
    return cached[1], cached[2]


def int8_draft_supported(draft: nn.Module) -> bool:
    """Whether ``draft`` runs as an int8 copy (:func:`int8_draft`) by default: a draft in eval mode
    on a CPU, in fp32, or in bf16 where this CPU has no native bf16 (a bf16 draft on a CPU with
    AVX512-BF16 / AMX keeps its dtype); every linear layer an exact ``nn.Linear`` (not a LoRA or
    otherwise wrapped one); and a torch build with a quantised CPU engine."""
    engines = getattr(torch.backends.quantized, "supported_engines", [])
    return (
        draft.device.type == "cpu"
        and (draft.dtype == torch.float32 or (draft.dtype == torch.bfloat16 and not bf16_is_native()))
        and not draft.training
        and any(engine != "none" for engine in engines)
        and all(type(module) is nn.Linear for module in draft.modules() if isinstance(module, nn.Linear))
    )


def use_int8_draft(draft: nn.Module, setting: bool | None) -> bool:
    """``generation_config.dflare_int8_draft``: None (default) runs the int8 copy wherever
    :func:`int8_draft_supported`; True insists (a clear error where it cannot); False keeps the draft as is."""
    supported = int8_draft_supported(draft)
    if setting is None:
        return supported and getattr(draft, "int8_on_cpu", True)
    if setting and not supported:
        raise ValueError(
            f"dflare_int8_draft=True: the draft is a {draft.dtype} model on {draft.device} (training={draft.training}); "
            "the int8 copy needs a draft in eval mode on a CPU, in fp32 (or bf16 where the CPU has no native bf16), with plain nn.Linear layers"
        )
    return bool(setting)


def _version(tensor: torch.Tensor) -> int:
    """A tensor's in-place version counter; 0 for an inference tensor (made under
    ``torch.inference_mode``, which keeps no counter: such a tensor is not updated in place)."""
    try:
        return tensor._version
    except RuntimeError:
        return 0


def _quantize_dynamic(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation (per-output-channel weight scales) of ``module``'s ``nn.Linear`` layers, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that these APIs move to torchao (the kernels stay)
        return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def int8_draft(draft: "DFlareModel") -> "DFlareModel":
    """An fp32 copy of ``draft`` whose linear layers run int8 kernels (weights quantised per output
    channel, activations per call), cached on the draft and rebuilt when its weights change.

    A draft's forward on a CPU is bound by reading its weights: SmolLM2's three-layer draft takes
    15 ms per block in fp32 on a 2-core AVX2 machine and 6.7 ms as int8, and its 16k-row head 6.4
    vs 1.0 ms (:func:`int8_head`). The draft only proposes; the target verifies every token, so the
    output of ``generate`` stays exactly the target's (acceptance moved from 2.08 to 2.03 on 12
    held-out prompts).
    """
    key = tuple((p.data_ptr(), _version(p)) for p in draft.parameters())
    cached = draft.__dict__.get("_dflare_int8")
    if cached is None or cached["key"] != key:
        # the copy leaves out what the draft caches for generation (stats, head rows, an older copy)
        memo = {id(draft.__dict__[name]): None for name in ("_dflare_int8", "_dflare_head_cache", "dflare_stats") if name in draft.__dict__}
        clone = _quantize_dynamic(copy.deepcopy(draft, memo).float().eval())
        cached = {"key": key, "model": clone, "head": None}
        draft.__dict__["_dflare_int8"] = cached
    return cached["model"]


def int8_head(draft: "DFlareModel", rows: torch.Tensor) -> nn.Module:
    """An int8 linear layer over the LM-head ``rows`` the draft proposes from (fp32 ``[rows, hidden]``),
    cached with :func:`int8_draft`'s copy; call it on ``[n, hidden]`` fp32 rows."""
    cached = draft.__dict__["_dflare_int8"]
    key = (rows.data_ptr(), _version(rows), tuple(rows.shape), rows.device)
    if cached["head"] is None or cached["head"][0] != key:
        # built on the meta device: no initialisation, so generate() leaves torch's global RNG alone
        linear = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(rows.detach().float(), requires_grad=False)
        cached["head"] = (key, _quantize_dynamic(nn.Sequential(linear))[0])
    return cached["head"][1]


def draft_for_generation(
    draft: "DFlareModel", head_rows: torch.Tensor, setting: bool | None = None
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    """How ``generate`` runs ``draft`` here: (the module to call, the head product for ``[..., k,
    hidden]`` draft states over ``head_rows``, the precision it runs in: "int8" or the draft's dtype).
    ``setting`` is ``generation_config.dflare_int8_draft`` (see :func:`use_int8_draft`)."""
    if not use_int8_draft(draft, setting):
        return draft, lambda hidden: head_logits(hidden, head_rows), str(draft.dtype).removeprefix("torch.")
    runner = int8_draft(draft)  # first: int8_head keeps its layer in this copy's cache entry
    head = int8_head(draft, head_rows)

    def logits(hidden: torch.Tensor) -> torch.Tensor:  # the int8 head takes the fp32 states as they are
        return head(hidden.reshape(-1, hidden.shape[-1]).float().contiguous()).reshape(*hidden.shape[:-1], -1)

    return runner, logits, "int8"


#: Linear calls over at most this many rows take the small-row CPU kernels of :func:`small_row_linears`.
SMALL_ROWS = 64
#: Weights with at least this many entries (a vocabulary-sized LM head) compute one row as two.
WIDE_WEIGHT = 1 << 22
#: Row count oneDNN lays a packed weight out for (any count 2..SMALL_ROWS then runs on it).
PACK_ROWS = 4
#: Kernel choices of :func:`small_row_linears` (``generation_config.dflare_small_row_kernels``).
SMALL_ROW_KERNELS = ("auto", "packed", "matmul", "rows")
#: Row counts ``"auto"`` times (a verify forward of a block of 8 runs 1-8 rows); counts between
#: two timed ones take the choice of the next timed count above, counts past the last its choice.
TIMED_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
#: A kernel replaces the stock one (then the "rows" one) only when timed at least this much faster
#: (a smaller gain is within the timing's noise, and the stock kernel is what plain decoding runs).
MIN_GAIN = 0.05

# module -> ((data pointer, version, shape) of its weight, oneDNN-packed copy); entries go with the module
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
# model -> {(torch threads, layer signatures): {layer signature: kernel per row count 1..SMALL_ROWS}}
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed-weight linear (``mkldnn._linear_pointwise``) enabled."""
    return bool(
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_weight(module: nn.Linear) -> torch.Tensor:
    """oneDNN's packed (blocked) copy of ``module``'s fp32 CPU weight, cached per module and rebuilt
    when the weight changes (another tensor, or an in-place update)."""
    weight = module.weight
    key = (weight.data_ptr(), _version(weight), tuple(weight.shape))
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        _PACKED[module] = cached
    return cached[1]


def _onednn_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


#: C++ source of the ``"rows"`` kernel (:func:`rows_kernel`): ``x @ W.T`` for a few fp32 rows that
#: reads each weight row once and multiplies it by every row of ``x`` while it is in registers, the
#: way a matrix-vector product reads it; AVX-512 or AVX2 + FMA, compiled for this machine's CPU.
ROWS_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <immintrin.h>

// Weight rows read side by side: one stream up to 4 rows of x (bound by memory, where one stream
// prefetches best), four from 5 (bound by arithmetic, where each loaded x vector serves four rows).
#define ROWS_PER_STEP(M) ((M) <= 4 ? 1 : 4)

#if defined(__AVX512F__)
typedef __m512 vec;
static constexpr int L = 16;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
static constexpr int L = 8;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload_n(const float* p, int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
#define DFLARE_NO_SIMD 1
#endif

#ifndef DFLARE_NO_SIMD
// R output features of y[m, n0:n0+R] = x[m, :] . W[n, :] for M rows: each weight row is read once.
template <int M, int R>
static inline void block(const float* x, const float* W, float* y, int64_t n0, int64_t N, int64_t K) {
  vec acc[R][M];
  for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  const float* w = W + n0 * K;
  const int64_t full = K - K % L;
  for (int64_t k = 0; k < full; k += L) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * K + k);
    for (int m = 0; m < M; ++m) {
      const vec xv = vload(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  if (full < K) {
    const int n = (int)(K - full);
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload_n(w + r * K + full, n);
    for (int m = 0; m < M; ++m) {
      const vec xv = vload_n(x + m * K + full, n);
      for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; ++m) for (int r = 0; r < R; ++r) y[m * N + n0 + r] = vsum(acc[r][m]);
}

template <int M>
static void rows(const float* x, const float* W, float* y, int64_t N, int64_t K) {
  constexpr int R = ROWS_PER_STEP(M);
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block<M, R>(x, W, y, b * R, N, K);
  });
  for (int64_t n = blocks * R; n < N; ++n) block<M, 1>(x, W, y, n, N, K);
}
#endif

bool available() {
#ifdef DFLARE_NO_SIMD
  return false;
#else
  return true;
#endif
}

torch::Tensor rows_linear(torch::Tensor x, torch::Tensor W) {
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "rows_linear: x [M, K] and W [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && W.scalar_type() == torch::kFloat, "rows_linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && W.is_contiguous() && x.device().is_cpu() && W.device().is_cpu(), "rows_linear: contiguous CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef DFLARE_NO_SIMD
  TORCH_CHECK(false, "rows_linear: built without AVX2/FMA or AVX-512");
#else
  const float* xp = x.data_ptr<float>();
  const float* wp = W.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t g = 0; g < M; g += 8) {  // each group of up to 8 rows reads W once
    const float* xg = xp + g * K;
    float* yg = yp + g * N;
    switch (std::min<int64_t>(8, M - g)) {
      case 1: rows<1>(xg, wp, yg, N, K); break;
      case 2: rows<2>(xg, wp, yg, N, K); break;
      case 3: rows<3>(xg, wp, yg, N, K); break;
      case 4: rows<4>(xg, wp, yg, N, K); break;
      case 5: rows<5>(xg, wp, yg, N, K); break;
      case 6: rows<6>(xg, wp, yg, N, K); break;
      case 7: rows<7>(xg, wp, yg, N, K); break;
      default: rows<8>(xg, wp, yg, N, K); break;
    }
  }
#endif
  return y;
}
"""

#: Seconds after which a build lock of the ``"rows"`` kernel counts as left by a process that died.
STALE_BUILD_LOCK = 900.0
_ROWS_LOCK = threading.Lock()
_ROWS_BUILT: dict[str, object] = {}


def rows_kernel_name() -> str:
    """The build's name: the kernel's source, torch's version and this CPU's instruction sets
    (``-march=native`` code must not be loaded on another CPU sharing the build folder)."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    features = sorted(name for name, value in capabilities.items() if value is True)
    digest = hashlib.sha1(json.dumps([ROWS_KERNEL_SOURCE, torch.__version__, features]).encode()).hexdigest()[:12]
    return f"dflare_rows_{digest}"


def rows_kernel():
    """The compiled ``"rows"`` kernel (a module with ``rows_linear(x, W)``), or None where it
    cannot be built here (no C++ compiler or ninja, a CPU without AVX2 + FMA, a build error).

    Built once per machine, CPU and torch version with ``torch.utils.cpp_extension.load_inline``
    (about 30 s on 2 cores, logged at INFO) into torch's extension folder
    (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), then loaded from there in
    about a second. Setting ``DFLARE_ROWS_KERNEL=0`` leaves it unbuilt.
    """
    if "kernel" in _ROWS_BUILT:  # every verify linear asks: answered without taking the lock
        return _ROWS_BUILT["kernel"]
    with _ROWS_LOCK:
        if "kernel" in _ROWS_BUILT:  # built by another thread meanwhile
            return _ROWS_BUILT["kernel"]
        _ROWS_BUILT["kernel"] = None
        if os.environ.get("DFLARE_ROWS_KERNEL", "1") == "0":
            return None
        try:
            from torch.utils import cpp_extension

            name = rows_kernel_name()
            folder = os.path.join(cpp_extension.get_default_build_root(), name)
            lock = os.path.join(folder, "lock")
            if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_BUILD_LOCK:
                os.remove(lock)  # our own build's lock, left by a process that died while building
            os.makedirs(folder, exist_ok=True)
            built = os.path.exists(os.path.join(folder, f"{name}.so"))
            if not built:
                logger.info("building the small-row verify kernel for this CPU (once per machine, about 30 s on 2 cores)")
            start = time.perf_counter()
            module = cpp_extension.load_inline(
                name,
                cpp_sources=[ROWS_KERNEL_SOURCE],
                functions=["rows_linear", "available"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=folder,
                verbose=False,
            )
            if not built:
                logger.info("small-row verify kernel built in %.0f s", time.perf_counter() - start)
            _ROWS_BUILT["kernel"] = module if module.available() else None
        except Exception as error:  # no compiler, no ninja, an unsupported CPU: the other kernels remain
            logger.info("the small-row verify kernel is not available here (%s: %s)", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return _ROWS_BUILT["kernel"]


def _run_kernel(kernel: str, module: nn.Linear, flat: torch.Tensor) -> torch.Tensor:
    """``module`` applied to ``flat`` [rows, in] on one kernel: ``"stock"`` (``F.linear``),
    ``"packed"`` (oneDNN on :func:`packed_weight`), ``"matmul"`` (``W @ x.T``, which MKL runs
    without repacking W), ``"rows"`` (:func:`rows_kernel`: each weight row read once for up to 8
    rows) or ``"tworow"`` (the rows twice through ``W @ x.T``: for one row a threaded GEMM instead
    of a single-threaded matrix-vector product)."""
    if kernel == "stock":
        return nn.functional.linear(flat, module.weight, module.bias)
    if kernel == "packed":
        return _onednn_linear(flat.contiguous(), packed_weight(module), module.bias)
    if kernel == "rows":
        out = rows_kernel().rows_linear(flat.contiguous(), module.weight)
    elif kernel == "tworow":
        out = (module.weight @ torch.cat([flat, flat]).T).T[: flat.shape[0]]
    else:
        out = (module.weight @ flat.T).T
    return out + module.bias if module.bias is not None else out


def _through(kernel: str, module: nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``module`` applied to ``x`` (any leading shape, ``rows`` rows in all) on ``kernel``."""
    if kernel == "stock":
        return nn.functional.linear(x, module.weight, module.bias)
    out = _run_kernel(kernel, module, x.reshape(rows, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _small_rows_in(module: nn.Linear, x: torch.Tensor) -> int:
    """How many rows ``x`` feeds ``module`` when the small-row kernels apply to it, else 0."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return rows if 1 <= rows <= SMALL_ROWS and x.dtype == module.weight.dtype else 0


def _small_row_linear(module: nn.Linear, x: torch.Tensor, kernels: str = "packed") -> torch.Tensor:
    rows = _small_rows_in(module, x)
    if rows and kernels == "rows" and module.weight.is_contiguous():
        kernel = "rows"
    elif rows == 1:
        # One row runs as a single-threaded matrix-vector product; two rows run as a threaded GEMM,
        # which on a 2-core AVX2 EPYC computes SmolLM2's 49,152 x 576 head in 4.7 ms instead of 10 ms.
        wide = module.weight.numel() >= WIDE_WEIGHT and torch.get_num_threads() >= 2
        kernel = "tworow" if wide else "stock"
    elif rows:
        kernel = "packed" if kernels == "packed" and module.weight.is_contiguous() else "matmul"
    else:
        kernel = "stock"
    return _through(kernel, module, x, rows)


def _chosen_linear(module: nn.Linear, chosen: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    rows = _small_rows_in(module, x)
    return _through(chosen[rows - 1] if rows else "stock", module, x, rows)


def _signature(module: nn.Linear) -> tuple:
    """What a kernel's speed on ``module`` depends on: weight shape, bias, layout."""
    return (tuple(module.weight.shape), module.bias is not None, module.weight.is_contiguous())


@torch.no_grad()
def choose_small_row_kernels(
    modules: list[nn.Linear], rounds: int = 3, clock: Callable[[], float] = time.perf_counter
) -> dict[tuple, tuple[str, ...]]:
    """Time the candidate kernels of :func:`_run_kernel` on ``modules`` and pick the fastest for
    each kind of layer (:func:`_signature`) and each row count in ``TIMED_ROWS``.

    Each kind is timed over all its layers in a row, as a forward reads them, so that the weights
    stream from memory as they do in a real forward rather than sit in cache. The candidates take
    turns within a round and each keeps its median over ``rounds`` (after one warm-up round, which
    also packs the weights), so a slow spell of a shared machine lands on all of them alike. The
    stock kernel stays unless another is at least ``MIN_GAIN`` faster, then the "rows" kernel
    (:func:`rows_kernel`, where it is built) on the same terms; packed copies of weights that
    no row count runs packed are freed. Returns ``{signature: (kernel for 1 row, ..., kernel for
    SMALL_ROWS rows)}``.
    """
    groups: dict[tuple, list[nn.Linear]] = {}
    for module in modules:
        groups.setdefault(_signature(module), []).append(module)
    packed = onednn_linear_available()
    rows_built = rows_kernel() is not None
    chosen: dict[tuple, tuple[str, ...]] = {}
    for signature, group in groups.items():
        (_, features), _, contiguous = signature
        timed: dict[int, str] = {}
        for rows in TIMED_ROWS:
            candidates = ["stock", "matmul"] + (["packed"] if packed and contiguous else []) + (["rows"] if rows_built and contiguous else [])
            candidates += ["tworow"] if rows == 1 else []
            x = torch.randn(rows, features, dtype=group[0].weight.dtype, generator=torch.Generator().manual_seed(rows))
            seconds: dict[str, list[float]] = {kernel: [] for kernel in candidates}
            for round_ in range(rounds + 1):
                for kernel in candidates:
                    start = clock()
                    for module in group:
                        _run_kernel(kernel, module, x)
                    if round_:  # the first round warms up (and packs)
                        seconds[kernel].append(clock() - start)
            median = {kernel: statistics.median(times) for kernel, times in seconds.items()}
            fastest = min(candidates, key=median.__getitem__)
            # a near-tie goes to the stock kernel (what plain decoding runs), then to "rows" (no
            # packed copy of the weight to keep)
            for preferred in ("stock", "rows"):
                if preferred in median and median[fastest] >= (1 - MIN_GAIN) * median[preferred]:
                    fastest = preferred
                    break
            timed[rows] = fastest
        chosen[signature] = tuple(timed[next((t for t in TIMED_ROWS if t >= rows), TIMED_ROWS[-1])] for rows in range(1, SMALL_ROWS + 1))
    _free_packed(modules, [chosen])  # timing packed them: free the copies no row count will read
    return chosen


def _free_packed(modules: Iterable[nn.Module], choices: Iterable[dict]) -> int:
    """Drop the packed copies of ``modules`` that none of ``choices`` (``{signature: kernels per row
    count}``) runs packed; returns how many were dropped."""
    choices = list(choices)
    unused = [m for m in modules if m in _PACKED and not any("packed" in c.get(_signature(m), ()) for c in choices)]
    for module in unused:
        del _PACKED[module]
    return len(unused)


def free_unused_packed_weights(model: nn.Module) -> int:
    """Free the packed weight copies (:func:`packed_weight`) of ``model``'s layers that no ``"auto"``
    choice timed for it runs packed, e.g. after a fixed ``"packed"`` run packed every layer again.
    Returns how many copies were freed; a layer that needs one later packs it again."""
    return _free_packed(model.modules(), _CHOSEN.get(model, {}).values())


def _chosen_kernels(model: nn.Module, modules: list[nn.Linear]) -> dict[tuple, tuple[str, ...]]:
    """:func:`choose_small_row_kernels` for ``model``'s layers, timed once per model and thread count."""
    key = (torch.get_num_threads(), tuple(sorted({_signature(module) for module in modules})))
    per_model = _CHOSEN.setdefault(model, {})
    if key not in per_model:
        start = time.perf_counter()
        per_model[key] = choose_small_row_kernels(modules)
        changed = {
            "x".join(map(str, signature[0])): {rows: kernels[rows - 1] for rows in TIMED_ROWS if kernels[rows - 1] != "stock"}
            for signature, kernels in per_model[key].items()
        }
        logger.info(
            "small-row kernels timed in %.1f s at %d thread(s); other than stock: %s",
            time.perf_counter() - start,
            key[0],
            {shape: rows for shape, rows in changed.items() if rows} or "none",
        )
    return per_model[key]


@contextlib.contextmanager
def small_row_linears(model: nn.Module, kernels: str = "auto") -> Iterator[int]:
    """Run ``model``'s fp32 CPU ``nn.Linear`` layers on 1..``SMALL_ROWS`` rows on small-row kernels.

    A verify forward multiplies every weight matrix by a handful of rows (the block being checked).
    Stock ``x @ W.T`` hands MKL a layout it repacks the whole weight for, so on a 2-core CPU a
    SmolLM2-135M forward over 2 tokens costs 88 ms against 55 ms for one. Which kernel is fastest
    depends on the row count and on the machine. ``kernels``:

    - ``"auto"`` (default): for each kind of layer and row count, the fastest of the stock kernel,
      ``"rows"`` (where it is built), ``"packed"``, ``"matmul"`` and (one row) the row computed
      twice, timed on this model's own layers once per model and thread count
      (:func:`choose_small_row_kernels`: 4-8 s for SmolLM2 on 2 cores, logged at INFO). Layers for
      which the stock kernel wins at every row count are left unswitched. On a 2-core AVX-512 Xeon
      without AVX512-BF16, before the "rows" kernel, it kept the stock kernel for every layer but
      the head, which runs packed from 4 rows: a SmolLM2 forward over 1 / 2 / 3 / 4 /
      6 / 8 tokens then cost 34 / 37 / 40 / 47 / 51 / 54 ms, against 33 / 37 / 39 / 51 / 54 / 61
      stock and 40 / 50 / 51 / 52 / 55 / 59 ``"packed"`` (2 threads, interleaved medians of 5).
    - ``"packed"``: oneDNN's linear on a copy of each weight packed once into its blocked layout
      (:func:`packed_weight`, cached with the module, rebuilt when the weight changes; it takes as
      much memory again as the weights: 509 MB for SmolLM2), from 2 rows. On a 2-core AVX2 EPYC a
      SmolLM2 forward over 2 / 3 / 4 / 6 / 9 tokens took 102 / 107 / 111 / 122 / 138 ms against
      109 / 134 / 112 / 149 / 177 ms as ``"matmul"`` (one token: 98 ms).
    - ``"matmul"``: ``W @ x.T`` from 2 rows: on a 2-core AVX512 EPYC a forward over 2-4 tokens cost
      about 45 ms and over 8 about 62 ms.
    - ``"rows"``: :func:`rows_kernel`, compiled for this CPU on first use, for every row count (a
      group of up to 8 rows reads each weight row once, as a matrix-vector product does); an
      error where it cannot be built.

    With ``"packed"`` and ``"matmul"`` one row keeps the stock kernel, except for a vocabulary-sized
    head (``WIDE_WEIGHT`` entries), computed as two rows with 2+ threads. Values agree with the
    stock kernels to float rounding (about 1e-5 on the logits), the same class of difference as
    between the stock one-row and multi-row kernels that any assisted decoding already mixes.

    Only exact ``nn.Linear`` modules are switched (not subclasses such as quantised or LoRA layers,
    not modules that already carry their own ``forward``, e.g. accelerate offload hooks), through
    an instance attribute that is removed on exit. Yields how many layers were switched.
    """
    if kernels not in SMALL_ROW_KERNELS:
        raise ValueError(f"small-row kernels {kernels!r}: expected one of {SMALL_ROW_KERNELS}")
    if kernels == "packed" and not onednn_linear_available():
        kernels = "matmul"
    if kernels == "rows" and rows_kernel() is None:
        raise RuntimeError(
            "small-row kernels 'rows': the kernel could not be built here (it needs a C++ compiler, ninja and a CPU "
            "with AVX2 + FMA; DFLARE_ROWS_KERNEL=0 turns it off); use 'auto', 'packed' or 'matmul'"
        )
    switched = [
        module
        for module in model.modules()
        if type(module) is nn.Linear
        and "forward" not in module.__dict__
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
    ]
    if kernels == "auto" and switched:
        chosen = _chosen_kernels(model, switched)
        # a layer the stock kernel suits at every row count stays as it is (no wrapper to pay for)
        switched = [module for module in switched if set(chosen[_signature(module)]) != {"stock"}]
    for module in switched:
        if kernels == "auto":
            module.forward = functools.partial(_chosen_linear, module, chosen[_signature(module)])
        else:
            module.forward = functools.partial(_small_row_linear, module, kernels=kernels)
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)


__all__ = [
    "SMALL_ROW_KERNELS",
    "bf16_is_native",
    "choose_small_row_kernels",
    "draft_for_generation",
    "draft_head",
    "fast_draft_dtype",
    "free_unused_packed_weights",
    "head_logits",
    "int8_draft",
    "int8_draft_supported",
    "onednn_linear_available",
    "packed_weight",
    "rows_kernel",
    "small_row_linears",
]
