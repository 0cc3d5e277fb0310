"""How the W4A4 GEMM chooses its decode tiles (gemm_w4a4.DECODE_TUNE): Triton's autotuner on graph replays of one
call ("graph", the default), or each candidate timed over rotating copies of the weights, from HBM ("rotate").

On the CPU: the switch, the number of copies, and the choice with a stand-in timer (fastest wins, timed once per
key, failing candidates skipped). On a GPU: rotate-tuned launches give the integer reference's results exactly.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

try:
    import flatquant  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, SRC)

from flatquant.kernels import gemm_w4a4 as gw  # noqa: E402

needs_triton = pytest.mark.skipif(not gw._HAS_TRITON, reason="needs triton")


def test_switch_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLATQUANT_DECODE_TUNE", raising=False)
    assert gw._decode_tune_from_env() == "graph"
    monkeypatch.setenv("FLATQUANT_DECODE_TUNE", "rotate")
    assert gw._decode_tune_from_env() == "rotate"
    monkeypatch.setenv("FLATQUANT_DECODE_TUNE", "cold")
    with pytest.raises(
        ValueError, match=r"FLATQUANT_DECODE_TUNE must be one of 'graph' \(the default\), 'rotate', got 'cold'"
    ):
        gw._decode_tune_from_env()


def test_rotating_copies_exceed_three_times_l2():
    l2 = 50 * 2**20
    for nbytes in (4096 * 2048, 11008 * 2048, 22016 * 2048, 2**20):
        c = gw.rotating_copies(nbytes, l2)
        assert 1 <= c <= 16 and (c * nbytes > 3 * l2 or c == 16) and (c == 1 or (c - 1) * nbytes <= 3 * l2)
    assert gw.rotating_copies(200 * 2**20, l2) == 1  # one weight larger than 3x L2: no copies


def _call(m=1, n=96, k=64, has_res=False):
    """The arguments and flags w4a4_gemm builds for a call, with CPU stand-ins (nothing is launched)."""
    w = torch.zeros(n, k // 2, dtype=torch.uint8)
    args = (torch.zeros(m, k, dtype=torch.int8), w, torch.zeros(m, n, dtype=torch.bfloat16))
    args += (None,) * 11 + (k,)
    flags = dict(HAS_ZERO=False, HAS_BIAS=False, HAS_GROUP=False, HAS_RES=has_res, USE_FP8=False, PDL=False)
    return args, flags


@needs_triton
def test_rotate_choice_takes_the_fastest_times_each_key_once_and_skips_failures(monkeypatch):
    monkeypatch.setattr(gw, "_l2_bytes", lambda dev: 3 * 96 * 32)  # three copies of the 96 x 32-byte weight
    monkeypatch.setattr(gw, "_ROTATE_CHOSEN", {})
    monkeypatch.setattr(gw, "_ROTATE_LAST", {})
    configs = list(gw._small.configs)
    times = [5.0 + (i * 7) % 11 for i in range(len(configs))]  # distinct, minimum somewhere in the middle
    times[0] = float("nan")  # stands for a candidate that cannot run (raises below)
    seen = []

    def fake_timer(launch, weights):
        seen.append(weights)
        t = times[(len(seen) - 1) % len(times)]
        if t != t:
            raise RuntimeError("out of resources")
        return t

    monkeypatch.setattr(gw, "time_rotating", fake_timer)
    args, flags = _call()
    got = gw._rotate_choice(gw._small, args, flags, 1, 96)
    want = configs[min(range(1, len(configs)), key=lambda i: times[i])]
    assert got == gw._launch_kwargs(want)
    assert len(seen) == len(configs)
    for weights in seen:  # the call's own weight, then distinct copies of its shape, 9x its size in all
        assert weights[0] is args[1] and len(weights) == 9
        assert len({w.data_ptr() for w in weights}) == 9 and all(w.shape == args[1].shape for w in weights)
    assert gw._rotate_choice(gw._small, args, flags, 1, 96) == got and len(seen) == len(configs)  # remembered
    monkeypatch.setattr(gw, "DECODE_TUNE", "rotate")
    assert gw.last_config(1) == got
    gw._rotate_choice(gw._small, args, flags, 2, 96)  # another bucket of M: timed afresh
    assert len(seen) == 2 * len(configs)


@needs_triton
def test_rotate_choice_keeps_residual_tiles_small_and_fails_clearly(monkeypatch):
    monkeypatch.setattr(gw, "_l2_bytes", lambda dev: 0)
    monkeypatch.setattr(gw, "_ROTATE_CHOSEN", {})
    timed = []

    def fake_timer(launch, weights):
        timed.append(launch.__defaults__[1])  # the launch's config (keyword default of the closure)
        return 1.0

    monkeypatch.setattr(gw, "time_rotating", fake_timer)
    args, flags = _call(m=64, has_res=True)
    gw._rotate_choice(gw._medium, args, flags, 64, 96)
    assert timed and all(kw["BLOCK_M"] * kw["BLOCK_N"] <= 128 * 128 for kw in timed)

    def failing(launch, weights):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(gw, "time_rotating", failing)
    with pytest.raises(RuntimeError, match="no decode tile config .* M=1, N=96, K=64"):
        gw._rotate_choice(gw._small, *_call(), 1, 96)


@pytest.mark.skipif(not torch.cuda.is_available() or not gw._HAS_TRITON, reason="needs a GPU")
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_rotate_tuned_launch_equals_the_integer_reference(monkeypatch, m):
    monkeypatch.setattr(gw, "DECODE_TUNE", "rotate")
    g = torch.Generator(device="cuda").manual_seed(m)
    n, k = 1024, 4096
    codes = torch.randint(-8, 8, (m, k), generator=g, device="cuda", dtype=torch.int8)
    w = gw.pack_int4(torch.randint(-8, 8, (n, k), generator=g, device="cuda", dtype=torch.int8))
    ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
    got = gw.w4a4_gemm(codes, ones_m, w, ones_n, out_dtype=torch.float32, impl="triton")
    want = gw.w4a4_gemm_reference(codes, ones_m, w, ones_n, out_dtype=torch.float32)
    assert torch.equal(got, want)
    assert gw.last_config(m) is not None
