"""INT4 KV-cache quantization and single-token decode attention over a 4-bit cache.

Quantizer contract (asymmetric, one group per (token, head) row over head_dim), exactly the fake quantizer of
``flatquant.quantizer`` with ``symmetric=False``, all in fp32:

    xmax = max(x.max(-1), 0) * clip_max ;  xmin = min(x.min(-1), 0) * clip_min
    scale = max(xmax - xmin, 1e-8) / (2^bits - 1) ;  zero = round(-xmin / scale)
    code = clamp(round(x / scale) + zero, 0, 2^bits - 1)          (round = torch.round, half to even)

so that ``(code - zero) * scale`` equals ``fake_quantize``'s output bit for bit. 4-bit codes are stored two per
byte, unsigned: byte j holds code 2j in its low nibble and code 2j+1 in its high nibble.

This file holds the plain PyTorch implementations; ``decode_attention`` is the dispatcher name the runtime
calls (here it is the reference).
"""

from __future__ import annotations

import torch

__all__ = ["decode_attention", "decode_attention_reference", "dequantize_kv", "quantize_kv"]

_EPS = 1e-8  # smallest scale, as in flatquant.quantizer


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits=}")


def quantize_kv(
    x: torch.Tensor, bits: int = 4, clip_max: float = 1.0, clip_min: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of x (..., D) asymmetrically (see the module doc).

    Returns (codes, scale fp32 (...,), zero fp32 (...,)); codes are uint8 (..., D // 2) packed for bits == 4,
    else uint8 (..., D) one code per byte.
    """
    _check_bits(bits)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a float tensor, got {x.dtype=}")
    d = x.shape[-1]
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {d=}")
    xf = x.float()  # (..., D)
    xmin, xmax = torch.aminmax(xf, dim=-1)  # (...,)
    xmax, xmin = xmax.clamp_min(0) * clip_max, xmin.clamp_max(0) * clip_min
    qmax = 2**bits - 1
    scale = (xmax - xmin).clamp_min(_EPS) / qmax
    zero = torch.round(-xmin / scale)
    codes = (torch.round(xf / scale[..., None]) + zero[..., None]).clamp_(0, qmax).to(torch.uint8)  # (..., D)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., D // 2)
    return codes, scale, zero


def dequantize_kv(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: (code - zero) * scale computed in fp32, returned in ``dtype``."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype=}")
    if bits == 4:
        c = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)  # (..., D)
    else:
        c = codes
    out = (c.float() - zero.float()[..., None]) * scale.float()[..., None]
    return out.to(dtype)


def decode_attention_reference(
    q: torch.Tensor,
    k_packed: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_packed: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """softmax(q K^T * sm_scale) V for one query token per sequence against a 4-bit cache (fp32 math).

    q: (B, Hq, D) fp16/bf16/fp32, Hq = Hkv * G (query head h reads kv head h // G).
    k_packed, v_packed: (B, Hkv, S_cap, D // 2) uint8; k_scale, k_zero, v_scale, v_zero: (B, Hkv, S_cap) fp32.
    seq_lens: (B,) int, valid cache positions per sequence (<= S_cap; at least 1).
    Returns (B, Hq, D) in q.dtype.
    """
    b, hq, d = q.shape
    _, hkv, s_cap, half = k_packed.shape
    if half * 2 != d or v_packed.shape != k_packed.shape:
        raise ValueError(f"cache shapes {tuple(k_packed.shape)}, {tuple(v_packed.shape)} do not fit q {tuple(q.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must have shape ({b},), got {tuple(seq_lens.shape)}")
    g = hq // hkv
    k = dequantize_kv(k_packed, k_scale, k_zero)  # (B, Hkv, S, D) fp32
    v = dequantize_kv(v_packed, v_scale, v_zero)
    qf = q.float().view(b, hkv, g, d)  # (B, Hkv, G, D): grouped, KV heads not duplicated
    scores = (qf @ k.transpose(-1, -2)) * sm_scale  # (B, Hkv, G, S)
    valid = torch.arange(s_cap, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, Hkv, G, D)
    return out.reshape(b, hq, d).to(q.dtype)


decode_attention = decode_attention_reference
