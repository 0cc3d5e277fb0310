"""A 16-bit activation times an int8 weight with per-row or per-group fp32 scales (W8A16): the 8-bit head.

``flatquant pack --head-bits 8`` stores the input embedding and the lm_head as symmetric int8 codes
``C`` (N, K) with fp32 scales ``S``: one per row (``S`` (N,)) or one per ``group`` consecutive columns of a
row (``S`` (N, K // group)). The lm_head computes, for x (M, K) in bf16 / fp16::

    out[m, n] = sum_g S[n, g] * sum_{k in group g} x[m, k] * C[n, k]        (rounded once to x's dtype)

Contract shared by the kernel and the reference: fp32 arithmetic, the result rounded once to x's dtype. The
kernel multiplies x by the codes exactly (|C| <= 127 is exact in both 16-bit types), sums each K block in fp32
and scales the block's sum (per-group scales) or the row's total (per-row scales); the reference multiplies x
by the dequantized weight ``C * S`` in fp32. They differ by fp32 rounding only (both tested against float64
within one rounding of the output dtype).

:func:`int8_linear_triton` streams the codes once (the decode lm_head is bound by reading them: half the bytes
of a 16-bit head) and runs the products on tensor cores: each K block is converted to x's dtype in registers
and multiplied with ``tl.dot``; per-group scales apply to each block's partial sum, per-row scales once in the
epilogue. :func:`int8_linear_reference` is the same arithmetic in PyTorch over row chunks (no full dequantized
copy of a large vocabulary). PyTorch's own ``aten._weight_int8pack_mm`` is not used on CUDA: it measured
18 ms per call for a 128256 x 4096 head at 16 tokens on an H100 (fp32 CUDA-core kernel).
"""

from __future__ import annotations

import torch

from . import kron_quantize as _kq
from . import kv_quant as _kv
from . import pdl as _pdl

triton, tl = _kq.triton, _kq.tl

__all__ = ["check_int8_weight", "int8_linear", "int8_linear_reference", "int8_linear_triton"]

_CHUNK = 16384  # rows of the reference's fp32 copy at a time
_MIN_TUNED_K = 64  # the smallest K block among the tuned configs: smaller scale groups take the fixed config


def check_int8_weight(codes: torch.Tensor, scale: torch.Tensor) -> int:
    """Validate (codes int8 (N, K), scale fp32 (N,) or (N, G) with G dividing K); returns the group size
    (K for per-row scales)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n, k = codes.shape
    if scale.dtype != torch.float32 or scale.shape[0] != n or scale.dim() not in (1, 2):
        raise ValueError(
            f"scale must be fp32 of shape ({n},) or ({n}, groups), got {scale.dtype} of shape {tuple(scale.shape)}"
        )
    groups = 1 if scale.dim() == 1 else scale.shape[1]
    if groups < 1 or k % groups:
        raise ValueError(f"scale has {groups} groups per row, which does not divide the {k} columns")
    return k // groups


def int8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The contract's arithmetic in PyTorch (fp32, dequantized a chunk of rows at a time): x (..., K) ->
    (..., N) in x's dtype."""
    group = check_int8_weight(codes, scale)
    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    lead, xf = x.shape[:-1], x.reshape(-1, k).float()
    s2 = scale.reshape(n, -1)
    parts = []
    for i in range(0, n, _CHUNK):  # dequantized rows in fp32, a chunk at a time
        w = (codes[i : i + _CHUNK].float().view(-1, k // group, group) * s2[i : i + _CHUNK, :, None]).view(-1, k)
        parts.append(xf @ w.T)
    out = torch.cat(parts, dim=-1) if parts else xf.new_zeros(xf.shape[0], 0)
    return out.to(x.dtype).reshape(*lead, n)


if triton is not None:

    @triton.jit
    def _int8_linear_kernel(
        x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
        GROUP: tl.constexpr, GROUPED: tl.constexpr, M_BUCKET: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        _pdl.wait_previous(PDL)
        # M_BUCKET only keys the autotuner (decode-size and prefill-size calls tune apart)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        w_row = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            xt = tl.load(x_row + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_row + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BLOCK_K, BLOCK_N)
            if INTERPRET:  # the interpreter converts int8 -> bf16 wrongly; fp32 is as exact
                wt = wt.to(tl.float32)
            else:
                wt = wt.to(x_ptr.dtype.element_ty)  # exact: |code| <= 127
            if GROUPED:  # BLOCK_K divides GROUP: the block lies in one group, scaled as one partial sum
                s = tl.load(s_ptr + rn.to(tl.int64) * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
                acc += _kq._dot(xt, wt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET) * s[None, :]
            else:
                acc = _kq._dot(xt, wt, acc, INTERPRET)
        if not GROUPED:
            s = tl.load(s_ptr + rn.to(tl.int64) * stride_sn, mask=n_ok, other=0.0)
            acc = acc * s[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, _kq._round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])

    def _configs():
        out = []
        for bm, bn, bk, w, st in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 256, 4, 4),
            (16, 128, 64, 4, 5), (16, 64, 64, 4, 6), (16, 32, 64, 4, 8),
            (32, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4),
            (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 4),
        ]:  # fmt: skip
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st))
        return out

    def _prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        keep = []
        for c in configs:
            bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
            if a["GROUPED"] and (a["GROUP"] % bk or bm == 128):  # 128-row tiles spill with a second accumulator
                continue
            if (a["M_BUCKET"] == 0) != (bm == 16):  # decode sizes: one 16-row tile; prefill: larger tiles
                continue
            keep.append(c)
        return keep or configs[:1]

    try:
        _int8_linear_tuned = _kq.autotune(
            _configs(), key=["N", "K", "GROUP", "GROUPED", "M_BUCKET"],
            prune_configs_by={"early_config_prune": _prune}, do_bench=_kq.graph_bench,
        )(_int8_linear_kernel)  # fmt: skip
    except TypeError:  # a triton before the do_bench argument
        _int8_linear_tuned = _kq.autotune(
            _configs(), key=["N", "K", "GROUP", "GROUPED", "M_BUCKET"],
            prune_configs_by={"early_config_prune": _prune}, use_cuda_graph=True,
        )(_int8_linear_kernel)  # fmt: skip


def _interpreting() -> bool:
    return triton is not None and type(_int8_linear_kernel).__name__ == "InterpretedFunction"


def _block_k(group: int, grouped: bool) -> int:
    """The fixed config's K block: 64, or the largest power of two dividing a group below 64."""
    bk = 64
    while grouped and group % bk:
        bk //= 2
    return bk


def int8_linear_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, config: dict | None = None):
    """One Triton launch of :func:`int8_linear_reference` (x (..., K) bf16 / fp16 with unit stride over K).
    config: fixed ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}`` instead of tuning (the
    interpreter always uses a fixed one). Grouped scales need groups of a multiple of 16 columns."""
    reason = _kv.triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"int8_linear triton kernel cannot run: {reason}")
    if x.dtype not in _kv._Q_DTYPES:
        raise ValueError(f"int8_linear_triton takes x in {_kv._Q_DTYPES}, got {x.dtype}")
    group = check_int8_weight(codes, scale)
    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if codes.device != x.device or scale.device != x.device:
        raise ValueError(f"x, codes and scale must share a device, got {x.device}, {codes.device}, {scale.device}")
    grouped = group < k
    if grouped and group % 16:
        raise ValueError(f"grouped scales need groups of a multiple of 16 columns for the kernel, got {group}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    s2 = scale.reshape(n, -1)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()  # the kernel steps through a row's groups with stride 1
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    bucket = 0 if m <= 16 else 1
    args = (x2, codes, s2, out, m, n, k, x2.stride(0), codes.stride(0), s2.stride(0), out.stride(0))
    if config is None and _kq.AUTOTUNE and not _interpreting() and (not grouped or group % _MIN_TUNED_K == 0):

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

        pdl = _pdl.launch_options(_pdl.pdl_on(x2))
        _int8_linear_tuned[grid](*args, GROUP=group, GROUPED=grouped, M_BUCKET=bucket, INTERPRET=False, **pdl)
    else:
        cfg = config or {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "BLOCK_K": _block_k(group, grouped)}
        if grouped and group % cfg["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} does not divide the scale group of {group} columns")
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
        _int8_linear_kernel[grid](
            *args, GROUP=group, GROUPED=grouped, M_BUCKET=bucket, INTERPRET=_interpreting(),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
            **_pdl.launch_options(_pdl.pdl_on(x2)),
        )  # fmt: skip
    return out.reshape(*lead, n)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x @ dequant(codes, scale)^T (see the module doc). impl: "auto" (Triton on CUDA for 16-bit x and scale
    groups the kernel takes, else the reference), "triton" or "torch" (forced; RuntimeError when the forced
    kernel cannot run)."""
    group = check_int8_weight(codes, scale)
    kernel_groups = group == codes.shape[1] or group % 16 == 0
    if _kv._pick(impl, x) == "triton" and (impl == "triton" or (x.dtype in _kv._Q_DTYPES and kernel_groups)):
        return int8_linear_triton(x, codes, scale)
    return int8_linear_reference(x, codes, scale)
