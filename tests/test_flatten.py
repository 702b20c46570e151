"""flatten / unflatten / unflatten_copy_ / FlatBuffer: the kernel in the interpret tier (and on CUDA with the
`gpu` mark), the public functions on both backends, and FlatBuffer's layout, views and bindings."""

import math

import pytest
import torch
from fused_ops.kernels import flatten as flatten_kernels

import fused_ops
from fused_ops import FlatBuffer, functional, reference

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, in the interpreter

CHUNK, BLOCK = 64, 32  # small, so that odd sizes cover several blocks and chunks
SIZES = [0, 1, 2, 13, 31, 32, 33, 64, 65, 97, 130]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpret, id="interpret"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpret), "reference", "auto"]


def _tensors(sizes, dtype, device="cpu"):
    return [torch.randn(n, device=device).to(dtype) for n in sizes]


def _count_launches(monkeypatch):
    launches = []
    real = flatten_kernels._flatten_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(flatten_kernels, "_flatten_kernel", Counting())
    return launches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("align", [1, 8, 48])
def test_kernel_gather_scatter_matches_reference(device, dtype, align, monkeypatch):
    """One launch gathers every tensor (padding zeroed, guards untouched) and one scatters them back."""
    ts = _tensors(SIZES, dtype, device)
    offsets, spans, total = reference.flatten_layout([t.numel() for t in ts], align)
    guard = 7
    buf = torch.full((total + 2 * guard,), float("nan"), dtype=dtype, device=device)  # poisoned
    flat = buf[guard : guard + total]
    launches = _count_launches(monkeypatch)
    flatten_kernels.flatten_launch(flat, ts, offsets, spans, chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert len(launches) == 1
    assert launches[0] == (sum(math.ceil(s / CHUNK) for s in spans),)
    expected = torch.zeros(total, dtype=dtype, device=device)
    reference.flatten_into_(expected, ts, offsets, spans)
    assert torch.equal(flat, expected)
    assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[-guard:]).all(), "kernel wrote outside flat"

    outs = [torch.full_like(t, float("nan")) for t in ts]
    flatten_kernels.flatten_launch(flat, outs, offsets, spans, scatter=True, chunk_size=CHUNK, block_size=BLOCK,
                                   cache={})  # fmt: skip
    assert len(launches) == 2
    for a, b in zip(outs, ts, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_bit_copy_keeps_specials(device):
    """A bit copy: nan, inf, -0.0 and subnormals survive unchanged (bf16)."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3.0], dtype=torch.bfloat16)
    x = x.to(device)
    flat = torch.full((64,), 5.0, dtype=torch.bfloat16, device=device)
    flatten_kernels.flatten_launch(flat, [x], [0], [64], chunk_size=CHUNK, block_size=BLOCK, cache={})
    assert torch.equal(flat[:6].view(torch.int16), x.view(torch.int16))
    assert (flat[6:] == 0).all()


@pytest.mark.interpret
def test_kernel_rejects_bad_input():
    flat = torch.zeros(128)
    with pytest.raises(ValueError, match="tensors\\[1\\]"):
        flatten_kernels.flatten_launch(flat, [torch.zeros(3), torch.zeros(3, dtype=torch.float16)], [0, 64], [64, 64],
                                       cache={})  # fmt: skip
    with pytest.raises(ValueError, match="segment 1"):
        flatten_kernels.flatten_launch(flat, [torch.zeros(3), torch.zeros(3)], [0, 100], [64, 64], cache={})
    with pytest.raises(ValueError, match="tensors\\[0\\] has 70 elements"):
        flatten_kernels.flatten_launch(flat, [torch.zeros(70)], [0], [64], cache={})
    with pytest.raises(ValueError, match="contiguous"):
        flatten_kernels.flatten_launch(flat, [torch.zeros(4, 4).t()], [0], [64], cache={})
    with pytest.raises(TypeError, match="flat must be"):
        flatten_kernels.flatten_launch(flat.int(), [torch.zeros(3)], [0], [64], cache={})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten_unflatten_roundtrip(backend, dtype):
    shapes = [(3, 5), (1,), (0,), (2, 3, 7), (67,), ()]
    ts = [torch.randn(s).to(dtype) for s in shapes]
    ts.append(torch.randn(6, 4).to(dtype).t())  # non-contiguous input
    flat = fused_ops.flatten(ts, align=16, backend=backend)
    assert flat.dtype == dtype and flat.dim() == 1 and flat.numel() % 16 == 0
    offsets, spans, total = reference.flatten_layout([t.numel() for t in ts], 16)
    assert flat.numel() == total
    views = fused_ops.unflatten(flat, ts, align=16)
    for v, t, off in zip(views, ts, offsets, strict=True):
        assert v.shape == t.shape and torch.equal(v, t)
        assert v.data_ptr() == flat.data_ptr() + off * flat.element_size() or t.numel() == 0
    mask = torch.ones(total, dtype=torch.bool)
    for off, t in zip(offsets, ts, strict=True):
        mask[off : off + t.numel()] = False
    assert (flat[mask] == 0).all(), "padding must be zero"
    views[0].fill_(3.0)  # views write through
    assert (flat[: ts[0].numel()] == 3.0).all()

    outs = [torch.full(t.shape, float("nan"), dtype=dtype) for t in ts]
    flat2 = fused_ops.flatten(ts, align=16, backend=backend)
    functional.unflatten_copy_(outs, flat2, align=16, backend=backend)
    for o, t in zip(outs, ts, strict=True):
        assert torch.equal(o, t)


def test_unflatten_accepts_shapes_and_checks_length():
    flat = torch.arange(128.0)
    a, b = fused_ops.unflatten(flat, [(2, 3), torch.Size([5])], align=64)
    assert torch.equal(a, torch.arange(6.0).view(2, 3)) and torch.equal(b, torch.arange(64.0, 69.0))
    with pytest.raises(ValueError, match="needs 192"):
        fused_ops.unflatten(flat, [(2, 3), (5,), (1,)], align=64)
    with pytest.raises(ValueError, match="1-d"):
        fused_ops.unflatten(flat.view(2, 64), [(2,)])


def test_flatten_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="tensors\\[1\\] is torch.float16"):
        fused_ops.flatten([x, torch.zeros(2, dtype=torch.float16)])
    with pytest.raises(ValueError, match="tensors\\[1\\] is torch.float32 on meta"):
        fused_ops.flatten([x, torch.zeros(2, device="meta")])
    with pytest.raises(TypeError, match="tensors\\[0\\] must be a floating-point"):
        fused_ops.flatten([torch.zeros(3, dtype=torch.int32)])
    for align in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="align"):
            fused_ops.flatten([x], align=align)
    with pytest.raises(TypeError, match="sequence of tensors"):
        fused_ops.flatten(x)
    with pytest.raises(ValueError, match="backend"):
        fused_ops.flatten([x], backend="cuda")
    flat = torch.zeros(64)
    with pytest.raises(ValueError, match="tensors\\[0\\] must be contiguous"):
        functional.unflatten_copy_([torch.zeros(4, 4).t()], torch.zeros(64))
    before = flat.clone()
    with pytest.raises(ValueError, match="tensors\\[0\\] is torch.float16"):
        functional.unflatten_copy_([torch.zeros(3, dtype=torch.float16)], flat)
    assert torch.equal(flat, before)
    assert fused_ops.flatten([]).numel() == 0


# -- FlatBuffer -------------------------------------------------------------------------------------------------


def _check_layout(fb, align, world_size, cap_elems=None):
    assert fb.data.numel() == fb.numel and fb.data.is_contiguous()
    prev_end = 0
    for b in fb.buckets:
        assert b.offset == prev_end and b.offset % align == 0
        assert b.numel % world_size == 0 and b.numel % align == 0
        prev_end = b.offset + b.numel
        used = sum(-(-fb.numels[i] // align) * align for i in b.indices)
        if cap_elems is not None and len(b.indices) > 1:
            assert used <= cap_elems
        for i in b.indices:
            assert b.offset <= fb.offsets[i] and fb.offsets[i] + fb.numels[i] <= b.offset + b.numel
    assert prev_end == fb.numel
    assert sorted(i for b in fb.buckets for i in b.indices) == list(range(len(fb)))
    for off in fb.offsets:
        assert off % align == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_flatbuffer_layout_views_and_copies(backend, world_size):
    shapes = [(5, 7), (1,), (0,), (300,), (13, 3), (64,), (2,)]
    ts = [torch.randn(s) for s in shapes]
    cap_mb = 200 * 4 / 2**20  # 200 fp32 elements per bucket
    fb = FlatBuffer(ts, align=16, bucket_cap_mb=cap_mb, world_size=world_size, backend=backend)
    _check_layout(fb, 16, world_size, cap_elems=200)
    assert len(fb.buckets) >= 3  # the 300-element tensor gets its own bucket
    for v, t in zip(fb.views, ts, strict=True):
        assert torch.equal(v, t) and (v.numel() == 0 or v.data_ptr() >= fb.data.data_ptr())
    inside = torch.zeros(fb.numel, dtype=torch.bool)
    for off, n in zip(fb.offsets, fb.numels, strict=True):
        inside[off : off + n] = True
    assert (fb.data[~inside] == 0).all(), "padding must be zero"
    for b in fb.buckets:
        shards = [b.shard(r) for r in range(world_size)]
        assert sum(s.numel() for s in shards) == b.numel
        assert torch.equal(torch.cat(shards), b.data)

    new = [torch.randn(s) for s in shapes]
    fb.copy_from_(new)
    outs = [torch.full(s, float("nan")) for s in shapes]
    fb.copy_to_(outs)
    for o, t in zip(outs, new, strict=True):
        assert torch.equal(o, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatbuffer_dtype_conversion(backend):
    """A bf16 -> fp32 buffer (e.g. master weights): values exact, padding zero; copying back rounds RNE."""
    ts = [torch.randn(n).to(torch.bfloat16) for n in (5, 33, 0, 70)]
    fb = FlatBuffer(ts, dtype=torch.float32, align=32, backend=backend)
    assert fb.dtype == torch.float32
    for v, t in zip(fb.views, ts, strict=True):
        assert torch.equal(v, t.float())
    assert fb.data.isfinite().all()
    fb.data.add_(1e-3)
    outs = [torch.empty_like(t) for t in ts]
    fb.copy_to_(outs)
    for o, v in zip(outs, fb.views, strict=True):
        assert torch.equal(o, v.to(torch.bfloat16))


@pytest.mark.parametrize("stage_on_host", [False, True])
def test_flatbuffer_from_params_binds_data(stage_on_host):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x = torch.randn(4, 7)
    expected = model(x)
    fb = FlatBuffer.from_params(params, align=8, bucket_cap_mb=40 * 4 / 2**20, world_size=2,
                                stage_on_host=stage_on_host)  # fmt: skip
    _check_layout(fb, 8, 2)
    for p, b, v in zip(params, before, fb.views, strict=True):
        assert torch.equal(p, b)
        assert p.data_ptr() == v.data_ptr(), "param.data must be a view of the flat storage"
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with torch.no_grad():
        fb.data.mul_(2.0)  # writes to the buffer change the params
    assert torch.equal(params[0], 2 * before[0])


def test_flatbuffer_for_grads_backward_writes_into_storage():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    x = torch.randn(5, 6)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in params]
    fb = FlatBuffer.for_grads(params, align=16, bucket_cap_mb=None, world_size=4)
    for p, e, v in zip(params, expected, fb.views, strict=True):
        assert p.grad.data_ptr() == v.data_ptr() and torch.equal(p.grad, e)  # existing grads copied in
    fb.zero_()
    model(x).square().sum().backward()
    model(x).square().sum().backward()  # accumulates in place
    for p, e, v in zip(params, expected, fb.views, strict=True):
        assert p.grad.data_ptr() == v.data_ptr()
        torch.testing.assert_close(v, 2 * e)
    norm = fused_ops.grad_norm([fb.data])  # one tensor: the whole model's grads
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([2 * e.flatten() for e in expected])))


def test_flatbuffer_rejects_bad_arguments():
    ts = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="tensors\\[1\\] is torch.float16"):
        FlatBuffer([ts[0], torch.zeros(2, dtype=torch.float16)])
    with pytest.raises(ValueError, match="align"):
        FlatBuffer(ts, align=0)
    with pytest.raises(ValueError, match="world_size"):
        FlatBuffer(ts, world_size=0)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        FlatBuffer(ts, bucket_cap_mb=-1)
    with pytest.raises(TypeError, match="tensors\\[0\\] must be a floating-point"):
        FlatBuffer([torch.zeros(3, dtype=torch.int64)])
    fb = FlatBuffer(ts)
    with pytest.raises(ValueError, match="tensors\\[1\\] has shape"):
        fb.copy_from_([torch.zeros(3), torch.zeros(5)])
    with pytest.raises(ValueError, match="got 1 tensors"):
        fb.bind_data_([torch.zeros(3)])
    with pytest.raises(ValueError, match="params\\[0\\] is torch.float64"):
        fb.bind_grads_([torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])
    empty = FlatBuffer([], dtype=torch.float32)
    assert empty.numel == 0 and empty.buckets == []


@pytest.mark.gpu
def test_flatbuffer_from_params_cuda_peak_memory():
    """Staging on the host: the device never holds params and storage at once (peak ~ one copy)."""
    params = [torch.nn.Parameter(torch.randn(1 << 20, device="cuda")) for _ in range(8)]  # 32 MiB
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fb = FlatBuffer.from_params(params, bucket_cap_mb=8)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 0.25 * 32 * 2**20
    assert fb.data.is_cuda and all(p.is_cuda for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ts = [torch.randn(n, device=device) for n in (3, 0, 70)]
    backend = "triton"
    offsets, spans, total = reference.flatten_layout([t.numel() for t in ts], 8)
    torch.library.opcheck(torch.ops.fused_ops.flatten.default, (ts, 8, backend))
    flat = torch.empty(total, device=device)
    torch.library.opcheck(torch.ops.fused_ops.flatten_into_.default, (flat, ts, offsets, spans, backend))
    torch.library.opcheck(torch.ops.fused_ops.unflatten_copy_.default, (ts, flat, offsets, backend))


def test_opcheck_reference():
    ts = [torch.randn(n) for n in (3, 0, 70)]
    offsets, spans, total = reference.flatten_layout([t.numel() for t in ts], 8)
    torch.library.opcheck(torch.ops.fused_ops.flatten.default, (ts, 8, "reference"))
    flat = torch.empty(total)
    torch.library.opcheck(torch.ops.fused_ops.flatten_into_.default, (flat, ts, offsets, spans, "reference"))
    torch.library.opcheck(torch.ops.fused_ops.unflatten_copy_.default, (ts, flat, offsets, "reference"))


# -- issue 9, part 3: the launcher's own caches never skip a check ---------------------------------------------------


def _stale_cases():
    """(first tensor, tensor at the same address with the same element count but something else) pairs."""
    base = torch.randn(256)
    return [
        (
            "other dtype",
            base[:64],
            base[:32].view(torch.bfloat16),
            ValueError,
            "is torch.bfloat16 on cpu, expected torch.float32 on cpu",
        ),
        ("non-contiguous", base[:64], base[::2][:64], ValueError, "must be contiguous"),
        (
            "other dtype, same size",
            base[:64],
            base[:64].view(torch.int32),
            TypeError,
            "must be float32, bfloat16, float16 or float64, got torch.int32",
        ),
    ]


@pytest.mark.interpret
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("case", range(3))
def test_kernel_checks_every_call_after_a_cached_one(scatter, case):
    """flatten_launch caches the segments' table by flat's address and the tensors' addresses by address and size:
    a tensor of another dtype or with other strides at a cached address used to run with the old layout (read
    as float32, or as contiguous). Every call checks; nothing is written on an error."""
    from tests.safety import expect_error_unchanged

    name, good, bad, exc, match = _stale_cases()[case]
    assert good.data_ptr() == bad.data_ptr() and good.numel() == bad.numel()
    cache = {}
    flat = torch.randn(128)
    flatten_kernels.flatten_launch(flat, [good], [0], [64], scatter=scatter, cache=cache, chunk_size=CHUNK,
                                   block_size=BLOCK)  # fmt: skip
    keep = good.clone()
    expect_error_unchanged(
        lambda: flatten_kernels.flatten_launch(
            flat, [bad], [0], [64], scatter=scatter, cache=cache, chunk_size=CHUNK, block_size=BLOCK
        ),  # fmt: skip
        exc,
        f"^flatten_launch: tensors\\[0\\] {match}",
        flat,
        good,
        bad,
    )
    assert torch.equal(good, keep)


@pytest.mark.interpret
def test_kernel_checks_a_shorter_segment_after_a_cached_call():
    """The tensors' entry is keyed by their sizes, the segments' by the layout: a tensor larger than its segment
    with a cached layout is refused (the gather would write past the segment)."""
    cache = {}
    flat = torch.zeros(128)
    x = torch.randn(64)
    flatten_kernels.flatten_launch(flat, [x], [0], [64], cache=cache, chunk_size=CHUNK, block_size=BLOCK)
    with pytest.raises(ValueError, match="tensors\\[0\\] has 64 elements, its segment only 32"):
        flatten_kernels.flatten_launch(flat, [x], [0], [32], cache=cache, chunk_size=CHUNK, block_size=BLOCK)
