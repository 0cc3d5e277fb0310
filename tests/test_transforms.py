import pytest
import torch

from flatquant.transforms import (
    KroneckerTransform,
    LearnableMatrix,
    hadamard_matrix,
    kron_apply,
    kron_factors,
    random_orthogonal,
)


def _best_pair_brute_force(n):
    pairs = [(a, n // a) for a in range(1, n + 1) if n % a == 0 and a <= n // a]
    return min(pairs, key=lambda p: p[0] + p[1])


@pytest.mark.parametrize(
    "n, expected",
    [
        (576, (24, 24)),
        (1536, (32, 48)),
        (3584, (56, 64)),
        (4096, (64, 64)),
        (5120, (64, 80)),
        (8192, (64, 128)),
        (11008, (86, 128)),
        (14336, (112, 128)),
        (18944, (128, 148)),
    ],
)
def test_factor_pairs_of_real_models(n, expected):
    assert kron_factors(n) == expected


@pytest.mark.parametrize("n", [1, 2, 6, 7, 13, 54, 70, 4098, 4099, 10006, 65521])
def test_factor_pairs_primes_and_2_mod_4(n):
    n1, n2 = kron_factors(n)
    assert n1 * n2 == n and n1 <= n2
    assert (n1, n2) == _best_pair_brute_force(n)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "64"])
def test_factor_pairs_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        kron_factors(bad)


@pytest.mark.parametrize("n1, n2", [(3, 5), (4, 4), (1, 7), (6, 10)])
def test_kron_apply_matches_torch_kron(n1, n2):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n1, n1, dtype=torch.float64, generator=g)
    b = torch.randn(n2, n2, dtype=torch.float64, generator=g)
    x = torch.randn(2, 3, n1 * n2, dtype=torch.float64, generator=g)
    expected = x @ torch.kron(a, b)
    torch.testing.assert_close(kron_apply(x, a, b), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kron_apply(x, a, None), x @ torch.kron(a, torch.eye(n2, dtype=torch.float64)))


@pytest.mark.parametrize("parametrisation", ["svd", "plain"])
@pytest.mark.parametrize("init", ["random", "identity", "hadamard"])
def test_learnable_matrix_inverse_is_accurate(parametrisation, init):
    m = LearnableMatrix(12, parametrisation, init, torch.Generator().manual_seed(0))
    with torch.no_grad():  # move away from the (orthogonal) start
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    p, p_inv = m.pair(torch.float64)
    eye = torch.eye(12, dtype=torch.float64)
    assert (p @ p_inv - eye).abs().max() < 1e-10
    assert (p - eye).abs().max() > 1e-3  # not trivially the identity


def test_svd_inverse_in_float32_beats_a_direct_inverse_in_half():
    m = LearnableMatrix(64, "svd", "random", torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.sigma.copy_(torch.linspace(0.5, 2.0, 64))
        m.skew_u.normal_(0, 0.1)
    p, p_inv = m.pair(torch.float32)
    p64 = m.pair(torch.float64)[0]
    err_closed = (p.double() @ p_inv.double() - torch.eye(64, dtype=torch.float64)).abs().max()
    direct = torch.linalg.inv(p64.half().float()).half().double()
    err_direct = (p64 @ direct - torch.eye(64, dtype=torch.float64)).abs().max()
    assert err_closed < 1e-5 < err_direct


def test_hadamard_is_orthonormal_and_needs_power_of_two():
    h = hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(9, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=torch.float64))


def test_kronecker_transform_factors_compose_to_an_inverse():
    t = KroneckerTransform.for_size(54, generator=torch.Generator().manual_seed(0))  # 54 = 6 x 9, n ≡ 2 mod 4
    (p1, p1i), (p2, p2i) = t.factors(torch.float64)
    full, full_inv = torch.kron(p1, p2), torch.kron(p1i, p2i)
    torch.testing.assert_close(full @ full_inv, torch.eye(54, dtype=torch.float64))


def test_batched_factor_precompute_matches_each_factor():
    from torch import nn

    from flatquant.transforms import factor_cache, precompute_factors

    g = torch.Generator().manual_seed(0)
    mats = nn.ModuleList([LearnableMatrix(n, "svd", "random", g) for n in (3, 9, 6, 9)])
    with torch.no_grad():
        for p in mats.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    singles = [m.pair(torch.float32) for m in mats]
    with factor_cache():
        precompute_factors(mats)
        batched = [m.pair(torch.float32) for m in mats]
    for (p, pi), (bp, bpi) in zip(singles, batched, strict=True):
        torch.testing.assert_close(bp, p, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bpi, pi, rtol=1e-5, atol=1e-5)
    loss = sum(bp.sum() for bp, _ in batched)
    loss.backward()  # gradients reach every factor through the padded batch
    assert all(m.skew_u.grad is not None and m.skew_u.grad.abs().sum() > 0 for m in mats)


def test_batched_factor_precompute_reads_no_host_tensor():
    """Every operand of the precompute is on the factors' device: a host tensor copied in each training step
    stalls the host on the GPU and breaks CUDA-graph capture of the step. Checked on the meta device, where a
    CPU operand is visible to a dispatch mode."""
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from flatquant.transforms import factor_cache, precompute_factors

    class HostOperands(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = tree_leaves((args, kwargs or {}))
            if any(torch.is_tensor(t) and t.device.type == "cpu" for t in leaves):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    mats = nn.ModuleList([LearnableMatrix(n, "svd", "random", g) for n in (3, 9, 6)]).to("meta")
    with factor_cache(), HostOperands() as mode:
        precompute_factors(mats)
    assert mode.seen == []
