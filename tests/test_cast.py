"""cast_: round-to-nearest-even bit-exact with torch's ``.to()`` (specials included), stochastic rounding's
bias over many draws, the kernel in the interpret tier (and on CUDA with the `gpu` mark), both backends."""

import math

import pytest
import torch
from fused_ops.kernels import cast as cast_kernels

import fused_ops
from fused_ops import reference

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter

CHUNK, BLOCK = 64, 32
SIZES = [0, 1, 2, 13, 31, 32, 33, 64, 65, 97, 130]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = [(s, d) for s in DTYPES for d in DTYPES]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference"]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _specials(dtype):
    """Values that exercise every rounding path, representable in ``dtype``."""
    f = [0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, -65520.0,
         65536.0, 1e5, 3.0e38, -3.3e38, 1e-5, -6e-5, 6.0e-8, 2.0**-25, 3 * 2.0**-26, 2.0**-24, 2.0**-14, 1e-30,
         1e-40, -1e-42, 1.401298464324817e-45, 2.0**-126, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11,
         1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8 + 2.0**-20, 0.1, 1.0 / 3.0]  # fmt: skip
    x = torch.tensor(f, dtype=torch.float32)
    # Exact ties for bf16 (low 16 bits 0x8000) with even and odd kept LSBs, random patterns, and every scale.
    ties = (torch.randint(0, 2**15, (64,), dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    rand_bits = torch.randint(-(2**31), 2**31 - 1, (256,), dtype=torch.int32).view(torch.float32)
    scales = torch.randn(256) * torch.logspace(-44, 38, 256)
    x = torch.cat([x, ties, -ties, rand_bits, scales])
    return x.to(dtype)


def _assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "nan positions differ"
    ia, ie = actual.view(_INT[actual.dtype]), expected.view(_INT[expected.dtype])
    bad = (ia != ie) & ~nan
    assert not bad.any(), f"{int(bad.sum())} elements differ, e.g. {actual[bad][:4]} vs {expected[bad][:4]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
def test_kernel_rne_bit_exact_with_torch(device, src_dtype, dst_dtype):
    src = _specials(src_dtype).to(device)
    pieces = list(torch.split(src, SIZES + [src.numel() - sum(SIZES)]))
    dst = [torch.full(p.shape, float("nan"), dtype=dst_dtype, device=device) for p in pieces]  # poisoned
    cast_kernels.cast_launch(dst, pieces, chunk_size=CHUNK, block_size=BLOCK, cache={})
    for d, s in zip(dst, pieces, strict=True):
        _assert_same_bits(d, s.to(dst_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_public_groups_mixed_pairs(backend):
    """One call with pairs of several (dst, src) dtypes: each group right, bit-exact."""
    src = [torch.randn(n).to(dt) for n, dt in zip(SIZES, DTYPES * 4, strict=False)]
    dst = [torch.full((n,), float("nan"), dtype=dt) for n, dt in zip(SIZES, reversed(DTYPES * 4), strict=False)]
    fused_ops.cast_(dst, src, backend=backend)
    for d, s in zip(dst, src, strict=True):
        _assert_same_bits(d, s.to(d.dtype))
    x = torch.randn(3, 5).t()  # non-contiguous src
    y = torch.empty(5, 3, dtype=torch.bfloat16)
    fused_ops.cast_([y], [x], backend=backend)
    _assert_same_bits(y, x.to(torch.bfloat16))


def test_cast_float64_goes_through_torch():
    x = torch.randn(7, dtype=torch.float64)
    y = torch.empty(7, dtype=torch.float32)
    fused_ops.cast_([y], [x])
    _assert_same_bits(y, x.float())
    with pytest.raises(TypeError, match="float64"):
        fused_ops.cast_([y], [x], backend="triton")


def _neighbours(x, dtype):
    """The two representable ``dtype`` values around fp32 ``x`` (equal when x is representable)."""
    rne = x.to(dtype)
    r = rne.float()
    outward = torch.where(x >= 0, float("inf"), -float("inf")).to(dtype)
    toward = torch.where(r.abs() > x.abs(), torch.nextafter(rne, torch.zeros_like(rne)), torch.nextafter(rne, outward))
    toward = torch.where(r == x, rne, toward)
    lo = torch.minimum(rne.float(), toward.float())
    hi = torch.maximum(rne.float(), toward.float())
    return lo, hi


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(backend, dtype):
    """Each result is one of the two neighbours, picked with probability proportional to the distance: over
    many draws the mean converges to the fp32 value (bias measured against the expected spread)."""
    n_values, draws = 48, 1024
    magnitudes = [1.0, 3e-3, 200.0, 1e-6] if dtype == torch.float16 else [1.0, 3e-3, 2e4, 1e-30]
    x = torch.cat([torch.randn(n_values // len(magnitudes)) * m for m in magnitudes])
    if dtype == torch.float16:
        x[0], x[1] = 65510.0, 3e-8  # next to overflow (rounds to 65504 or inf) and in the subnormal range
    src = x.repeat(draws)
    dst = torch.full(src.shape, float("nan"), dtype=dtype)
    fused_ops.cast_([dst], [src], stochastic=True, seed=1234, backend=backend)
    lo, hi = _neighbours(x, dtype)
    out = dst.float().view(draws, n_values)
    if dtype == torch.float16:  # 65510 may round to inf (65536 in the grid) with probability 6/32
        out[:, 0] = torch.where(torch.isinf(out[:, 0]), torch.tensor(65536.0), out[:, 0])
        hi[0] = 65536.0
    assert ((out == lo) | (out == hi)).all(), "results must be one of the two neighbours"
    gap = (hi - lo).double()
    p_up = torch.where(gap > 0, (x.double() - lo.double()) / gap, torch.zeros_like(gap))
    freq_up = (out == hi).double().mean(0)
    sigma = torch.sqrt(p_up * (1 - p_up) / draws).clamp_min(1e-3)
    z = (freq_up - p_up) / sigma
    assert z.abs().max() < 5.5, f"per-value bias too large: z = {z.abs().max():.2f}"
    overall = (freq_up - p_up).sum() / torch.sqrt((p_up * (1 - p_up)).sum() / draws)
    assert overall.abs() < 5, f"overall bias {overall:.2f} sigma"
    mean = (out.double().mean(0) - x.double()) / gap.clamp_min(1e-300)
    assert mean[gap > 0].abs().mean() < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_stochastic_specials_and_seeds(device, dtype):
    src = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -2.0, 2.0**20, -(2.0**20)]
    src = torch.tensor(src, device=device)
    src = src.repeat(20)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    cast_kernels.cast_launch([out], [src], stochastic=True, seed=5, chunk_size=CHUNK, block_size=BLOCK, cache={})
    expected = src.to(dtype)  # specials and representable values are kept exactly, overflow is inf
    _assert_same_bits(out, expected)

    x = torch.rand(97, device=device) + 1.0
    a, b, c = (torch.empty(97, dtype=dtype, device=device) for _ in range(3))
    for o, seed in ((a, 11), (b, 11), (c, 12)):
        cast_kernels.cast_launch([o], [x], stochastic=True, seed=seed, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert torch.equal(a, b), "same seed, same bits"
    assert not torch.equal(a, c), "another seed, other draws"


@pytest.mark.interpret
def test_stochastic_seed_none_follows_torch_manual_seed():
    x = torch.rand(64) + 1.0
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        o = torch.empty(64, dtype=torch.bfloat16)
        fused_ops.cast_([o], [x], stochastic=True, backend="triton")
        outs.append(o)
    assert torch.equal(outs[0], outs[1])


def test_stochastic_to_fp32_is_a_plain_copy():
    x = torch.randn(33, dtype=torch.bfloat16)
    y = torch.empty(33)
    fused_ops.cast_([y], [x], stochastic=True, seed=0)
    assert torch.equal(y, x.float())


def test_cast_rejects_bad_arguments():
    a, b = torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
    before = b.clone()
    with pytest.raises(ValueError, match="dst has 2 tensors but src has 1"):
        fused_ops.cast_([b, b], [a])
    with pytest.raises(ValueError, match="dst\\[1\\] has shape"):
        fused_ops.cast_([b, torch.zeros(4, dtype=torch.bfloat16)], [a, a])
    with pytest.raises(TypeError, match="src\\[0\\] must be a floating-point"):
        fused_ops.cast_([b], [torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="dst\\[0\\] is on cpu but src\\[0\\] is on meta"):
        fused_ops.cast_([b], [torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="dst\\[0\\] has elements that share memory"):
        fused_ops.cast_([torch.zeros(1, dtype=torch.bfloat16).expand(3)], [torch.zeros(3)])
    dst, src = torch.zeros(3, 4, dtype=torch.bfloat16).t(), torch.randn(4, 3)  # any layout, as dst.copy_(src)
    fused_ops.cast_([dst], [src])
    assert torch.equal(dst, src.to(torch.bfloat16)) and dst.stride() == (1, 4)
    for seed in (-1, 2**31, 1.5):
        with pytest.raises(ValueError, match="seed"):
            fused_ops.cast_([b], [a], stochastic=True, seed=seed)
    assert torch.equal(b, before)


@pytest.mark.interpret
def test_kernel_one_launch_for_many_tensors(monkeypatch):
    launches = []
    real = cast_kernels._cast_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(cast_kernels, "_cast_kernel", Counting())
    src = [torch.randn(n) for n in SIZES]
    dst = [torch.empty(n, dtype=torch.float16) for n in SIZES]
    cast_kernels.cast_launch(dst, src, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert launches == [(sum(math.ceil(n / CHUNK) for n in SIZES),)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    src = [torch.randn(n, device=device) for n in (3, 0, 70)]
    dst = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in (3, 0, 70)]
    torch.library.opcheck(torch.ops.fused_ops.cast_.default, (dst, src, False, 0, "triton"))
    torch.library.opcheck(torch.ops.fused_ops.cast_.default, (dst, src, True, 7, "triton"))


def test_opcheck_reference():
    src = [torch.randn(n) for n in (3, 0, 70)]
    dst = [torch.empty(n, dtype=torch.float16) for n in (3, 0, 70)]
    torch.library.opcheck(torch.ops.fused_ops.cast_.default, (dst, src, True, 7, "reference"))


def test_reference_stochastic_round_matches_documented_rule():
    """The reference (CPU path) rounds like the kernel: always a neighbour, exact values kept."""
    x = torch.tensor([1.0, 1.0 + 2.0**-9, -3.0, 2.0**-20])
    y = torch.empty(4, dtype=torch.bfloat16)
    reference.cast_([y], [x], stochastic=True, seed=1)
    lo, hi = _neighbours(x, torch.bfloat16)
    assert ((y.float() == lo) | (y.float() == hi)).all()


# -- issue 9, part 6: stochastic rounding inside a CUDA graph capture -----------------------------------------------


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_reads_its_key_from_a_device_tensor(dtype):
    """A captured launch replays its arguments, so a host-int seed would draw the same bits at every replay. With
    ``seed`` a 1-element int64 device tensor the key is read on the device when the kernel runs: the same launch
    arguments draw new bits once the tensor changes (as a graph replay's fresh key does), the old ones again
    when it is restored."""
    x = torch.rand(97) + 1.0
    key = torch.tensor([1234], dtype=torch.int64)
    outs = []
    for value in (1234, 99, 1234):
        key.fill_(value)
        o = torch.empty(97, dtype=dtype)
        cast_kernels.cast_launch([o], [x], stochastic=True, seed=key, chunk_size=CHUNK, block_size=BLOCK, cache={})
        outs.append(o)
    assert torch.equal(outs[0], outs[2]), "same key, same bits"
    assert not torch.equal(outs[0], outs[1]), "another key (as a replay draws), other bits"
    lo, hi = _neighbours(x, dtype)
    assert all(((o.float() == lo) | (o.float() == hi)).all() for o in outs)


@pytest.mark.interpret
def test_kernel_rejects_a_bad_seed_tensor():
    x, o = torch.rand(9), torch.empty(9, dtype=torch.bfloat16)
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(1), torch.zeros(1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="^cast_launch: seed must be an int in .* or a 1-element int64"):
            cast_kernels.cast_launch([o], [x], stochastic=True, seed=bad, cache={})


@pytest.mark.interpret
def test_stochastic_without_seed_passes_a_device_key(monkeypatch):
    """seed=None: the key is drawn on the tensors' device by torch's generator (a device op: graph-safe, new at
    every replay, reproducible with torch.manual_seed) and handed to the kernel as a tensor, never a host int."""
    seen = []
    real = cast_kernels.cast_launch

    def spy(dst, src, *, stochastic=False, seed=0, **kwargs):
        seen.append(seed)
        return real(dst, src, stochastic=stochastic, seed=seed, **kwargs)

    monkeypatch.setattr(cast_kernels, "cast_launch", spy)
    x = torch.rand(40) + 1.0
    o = torch.empty(40, dtype=torch.bfloat16)
    fused_ops.cast_([o], [x], stochastic=True, backend="triton")
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    assert seen[0].dtype == torch.int64 and seen[0].numel() == 1 and seen[0].device == x.device
    fused_ops.cast_([o], [x], stochastic=True, seed=5, backend="triton")
    assert seen[1] == 5, "an explicit seed stays a host int: reproducible, the same at every replay"


def test_stochastic_without_seed_reads_nothing_on_the_host(monkeypatch):
    """The plain-torch path draws from torch's default generator of the device too (no host value, no
    per-call Generator seeded from the host)."""
    from tests.utils import no_host_reads

    x = torch.rand(40) + 1.0
    o = torch.empty(40, dtype=torch.bfloat16)
    with no_host_reads(monkeypatch):
        fused_ops.cast_([o], [x], stochastic=True, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_without_seed_draws_new_bits_each_call(backend):
    x = torch.rand(256) + 1.0
    a, b = torch.empty(256, dtype=torch.bfloat16), torch.empty(256, dtype=torch.bfloat16)
    fused_ops.cast_([a], [x], stochastic=True, backend=backend)
    fused_ops.cast_([b], [x], stochastic=True, backend=backend)
    assert not torch.equal(a, b)
    c, d = torch.empty(256, dtype=torch.bfloat16), torch.empty(256, dtype=torch.bfloat16)
    torch.manual_seed(7)
    fused_ops.cast_([c], [x], stochastic=True, backend=backend)
    torch.manual_seed(7)
    fused_ops.cast_([d], [x], stochastic=True, backend=backend)
    assert torch.equal(c, d), "reproducible with torch.manual_seed"


@pytest.mark.gpu
def test_stochastic_cast_in_a_cuda_graph_draws_new_bits_at_every_replay():
    """seed=None: the key is drawn on the device inside the graph, so each replay rounds with new bits; an explicit
    seed is baked in: every replay gives the eager result with that seed."""
    x = torch.rand(4096, device="cuda") + 1.0
    o = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
    for seed in (None, 7):
        fused_ops.cast_([o], [x], stochastic=True, seed=seed)  # warm-up: builds the chunk table eagerly
        eager = o.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_ops.cast_([o], [x], stochastic=True, seed=seed)
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(o.clone())
        torch.cuda.synchronize()
        lo, hi = _neighbours(x.cpu(), torch.bfloat16)
        assert all(((r.float().cpu() == lo) | (r.float().cpu() == hi)).all() for r in replays)
        if seed is None:
            assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])
        else:
            assert all(torch.equal(r, eager) for r in replays)
