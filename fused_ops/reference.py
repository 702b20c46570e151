"""Plain-torch implementations of every fused_ops op: the test oracle and the CPU code path.

Everything here runs on any device and any floating dtype, float64 included (tests compute the oracle
in float64). Nothing here imports triton.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """One Adam / AdamW step in plain torch, with torch.optim.adam's order of operations.

    Same contract as the fused op: ``state_steps`` are incremented here (unless ``found_inf`` is set, in
    which case nothing at all changes), or, when it is empty, ``step`` is the step number to use.
    ``grad_scale`` divides the grads (the grads themselves are not modified). Low-precision params are
    updated in the dtype of the states (fp32 in fused_ops) and rounded to nearest even on store; when
    every tensor is float64 the whole computation is float64 (the test oracle). With ``master_params``
    the update runs on those (fp32) and ``params`` receive the rounded result.

    This reads ``found_inf``, ``lr`` and step counts on the host: cheap on CPU; on a GPU it syncs, which is
    why the GPU path is the Triton kernel.
    """
    _adam_prepare(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, step=step,
        grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
    )()  # fmt: skip


def _noop() -> None:
    pass


def _next_steps(
    state_steps: Sequence[Tensor], chained: bool = False
) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """The step counts after ``add_(1)`` of each, computed out of place: ``(writes, new)`` where ``new[i]`` is count
    ``i``'s new value (a new tensor) and ``writes`` the ``(count, value)`` copies that store them (one per memory: a
    count listed twice is added to twice, as in-place adds would). ``new[i]`` of a count listed more than once: its
    value after every add (as read after a multi-tensor ``add_``), or with ``chained`` after its own (as read right
    after each ``add_``). Distinct counts (the usual case) give ``new`` None (read them with :func:`_plus_one`) and
    writes that add to them in place. Nothing is changed here."""
    ptrs = list(map(Tensor.data_ptr, state_steps))  # (torch's own method: nothing the caller set on a count)
    if len(set(ptrs)) == len(ptrs):
        # (distinct counts, the usual case: no new tensors, 10^4 of them cost more than the step; stored by one
        # in-place add, which allocates nothing. ``new`` is None: see _plus_one)
        return _AddOne(list(state_steps)), None
    latest: dict[int, tuple[Tensor, Tensor]] = {}
    new = []
    for s, ptr in zip(state_steps, ptrs):
        base = latest[ptr][1] if ptr in latest else s
        value = base + 1
        new.append(value)
        latest[ptr] = (latest[ptr][0] if ptr in latest else s, value)
    if not chained:
        new = [latest[ptr][1] for ptr in ptrs]
    return list(latest.values()), new


class _AddOne(list):
    """The writes of distinct step counts (:func:`_next_steps`): one in-place ``add_(1)`` each."""


def _plus_one(state_steps: Sequence[Tensor]) -> list[float]:
    """Each count's value after ``add_(1)``, read on the host (in the counts' dtype: float32 rounds as the in-place
    add will), computed out of place: nothing is changed."""
    values = [s.item() for s in state_steps]
    dtypes = {s.dtype for s in state_steps}
    if len(dtypes) == 1:
        return torch.tensor(values, dtype=dtypes.pop()).add_(1).tolist()
    return [_scalar(s + 1) for s in state_steps]


def _store_steps(writes: list[tuple[Tensor, Tensor]]) -> None:
    """Store the new step counts of :func:`_next_steps` (no allocation)."""
    if isinstance(writes, _AddOne):
        if writes:
            torch._foreach_add_(list(writes), 1)
    elif writes:
        torch._foreach_copy_([d for d, _ in writes], [v for _, v in writes])


def _adam_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
):
    """:func:`adam_` in two phases: every new value computed out of place here (all the allocations; nothing the
    step writes is changed), returned with the function that stores them (copies into the existing tensors, the step
    counts last). An error here leaves every tensor as it was."""
    if len(params) == 0:
        return _noop
    if found_inf is not None and _scalar(found_inf) != 0:
        return _noop
    lr = _scalar(lr)
    step_writes: list[tuple[Tensor, Tensor]] = []
    if state_steps:
        step_writes, new_steps = _next_steps(state_steps)
        steps = _plus_one(state_steps) if new_steps is None else [_scalar(s) for s in new_steps]
    else:
        steps = [float(step)] * len(params)

    compute_dtype = exp_avgs[0].dtype
    if master_params:
        params_c = list(master_params)
    else:
        params_c = [p if p.dtype == compute_dtype else p.to(compute_dtype) for p in params]
    g = [x if x.dtype == compute_dtype else x.to(compute_dtype) for x in grads]
    if grad_scale is not None:
        g = torch._foreach_div(g, _scalar(grad_scale))
    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        if decoupled:
            params_c = torch._foreach_mul(params_c, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, params_c, alpha=weight_decay)
    ms = torch._foreach_lerp(list(exp_avgs), g, 1 - beta1)
    vs = torch._foreach_mul(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(vs, g, g, 1 - beta2)
    maxs = []
    if amsgrad:
        maxs = torch._foreach_maximum(list(max_exp_avg_sqs), vs)
        denom = torch._foreach_sqrt(maxs)
    else:
        denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    new_params = torch._foreach_addcdiv(params_c, ms, denom, [-lr / (1 - beta1**s) for s in steps])
    del denom, g

    def commit() -> None:
        torch._foreach_copy_(list(exp_avgs), ms)
        torch._foreach_copy_(list(exp_avg_sqs), vs)
        if amsgrad:
            torch._foreach_copy_(list(max_exp_avg_sqs), maxs)
        if master_params:
            torch._foreach_copy_(list(master_params), new_params)
        for p, pc in zip(params, new_params):
            p.copy_(pc)  # (rounded to nearest even)
        _store_steps(step_writes)

    return commit


def _adam_cpu_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
) -> None:
    """The CPU path of the Adam op: :func:`adam_`'s contract, as fast as torch allows on CPU.

    The update runs in torch's one-pass vectorised CPU kernel (``torch._fused_adam(w)_``, the kernel behind
    ``torch.optim.AdamW(fused=True)``) on fp32 work tensors: the params themselves when they are fp32, the
    fp32 masters when given, else fp32 copies of bf16/fp16 params, which are then copied back rounded to
    nearest even. Other devices or state dtypes go through :func:`adam_`.

    Private: it checks nothing (nor does torch's fused kernel, which reads and writes ``numel`` elements of each
    param at every tensor's address): its callers (the ``fused_ops::adam_`` op, the eager optimizer step,
    ``functional.adam_``) check every tensor first.
    """
    _adam_cpu_prepare(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, step=step,
        grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
    )()  # fmt: skip


def _adam_cpu_prepare(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    step: float | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    master_params: Sequence[Tensor] = (),
):
    """:func:`_adam_cpu_` in two phases (see :func:`_adam_prepare`): every allocation here (new step counts, divided
    grads, the fp32 scratch buffers of the batches), nothing written; the returned function runs torch's fused kernel
    in place, batch by batch, on the params, moments and scratch buffers (copies into existing memory), then stores
    the step counts. An error here leaves every tensor as it was."""
    if len(params) == 0:
        return _noop
    if params[0].device.type != "cpu" or exp_avgs[0].dtype != torch.float32:
        return _adam_prepare(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled=decoupled, step=step, grad_scale=grad_scale, found_inf=found_inf, master_params=master_params,
        )  # fmt: skip
    if found_inf is not None and _scalar(found_inf) != 0:
        return _noop
    step_writes: list[tuple[Tensor, Tensor]] = []
    add_first = False  # (distinct counts: added to in place right before the kernel, which reads them)
    if state_steps:
        step_writes, steps = _next_steps(state_steps)  # (the kernel reads the new counts; stored last)
        if steps is None:
            add_first, steps = True, list(state_steps)
    else:
        steps = [torch.tensor(float(step))] * len(params)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    hyper = dict(lr=_scalar(lr), beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                 maximize=maximize)  # fmt: skip
    scale = None if grad_scale is None else _scalar(grad_scale)
    lowp = params[0].dtype != torch.float32
    fp32_grads = grads[0].dtype == torch.float32
    # fp32 copies (of bf16/fp16 params without masters, of low-precision grads) are made a cache-sized batch
    # at a time, in scratch buffers allocated here for the largest batch: they are still in cache when the fused
    # kernel reads them, and are never all alive at once.
    batch_elems = 1 << 18 if lowp or not fp32_grads else None
    if batch_elems is not None and any(p.numel() > batch_elems for p in params):
        # (a tensor larger than a batch in slices of one: the scratch buffers are sized by the largest batch)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps = _sliced(
            batch_elems, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else (), master_params, steps
        )
    numels = [p.numel() for p in params]
    batches = list(_batches(numels, batch_elems))
    largest = max(sum(numels[lo:hi]) for lo, hi in batches)
    param_buf = torch.empty(largest, dtype=torch.float32) if lowp and not master_params else None
    # Grads are divided here, not by torch's kernel, which would write unscaled grads into the caller's.
    divided = None
    grad_buf = None
    if fp32_grads and scale is not None and len(batches) == 1:
        divided = torch._foreach_div(list(grads), scale)
    elif not fp32_grads or scale is not None:
        grad_buf = torch.empty(largest, dtype=torch.float32)

    def views(buf: Tensor, ts: list[Tensor]) -> list[Tensor]:
        out, off = [], 0
        for t in ts:
            out.append(buf.narrow(0, off, t.numel()).view(t.shape))
            off += t.numel()
        return out

    def commit() -> None:
        if add_first:
            _store_steps(step_writes)
        for lo, hi in batches:
            ps = list(params[lo:hi])
            if master_params:
                work = list(master_params[lo:hi])
            elif param_buf is not None:
                work = views(param_buf, ps)
                torch._foreach_copy_(work, ps)  # (p.float(): exact)
            else:
                work = ps
            if divided is not None:
                g = divided
            elif grad_buf is not None:
                g = views(grad_buf, list(grads[lo:hi]))
                torch._foreach_copy_(g, list(grads[lo:hi]))
                if scale is not None:
                    torch._foreach_div_(g, scale)
            else:
                g = list(grads[lo:hi])
            maxvs = list(max_exp_avg_sqs[lo:hi]) if amsgrad else []
            fused(work, g, list(exp_avgs[lo:hi]), list(exp_avg_sqs[lo:hi]), maxvs, steps[lo:hi], **hyper)
            if work[0] is not ps[0]:
                torch._foreach_copy_(ps, work)
        if not add_first:
            _store_steps(step_writes)

    return commit


def _sliced(limit: int, params: Sequence[Tensor], *others: Sequence[Tensor]) -> list[list[Tensor]]:
    """``params`` and the per-param lists ``others`` (each empty or as long; a step count may stand for several
    params: 0-d, repeated for each slice), with each param of more than ``limit`` elements, whose tensors are all
    contiguous, replaced by flat slices of at most ``limit`` elements of each of them (views: writes reach them)."""
    out: list[list[Tensor]] = [[] for _ in range(1 + len(others))]
    lists = [params, *others]
    for i, p in enumerate(params):
        row = [xs[i] for xs in lists if len(xs)]
        n = p.numel()
        if n <= limit or not all(t.is_contiguous() for t in row if t.numel() == n):
            for xs, o in zip(lists, out, strict=True):
                if len(xs):
                    o.append(xs[i])
            continue
        for start in range(0, n, limit):
            size = min(limit, n - start)
            for xs, o in zip(lists, out, strict=True):
                if len(xs):
                    t = xs[i]
                    o.append(t.view(-1).narrow(0, start, size) if t.numel() == n else t)
    return out


def _batches(numels: Sequence[int], limit: int | None):
    """(lo, hi) index ranges covering ``numels`` in order, each of about ``limit`` elements (one if None)."""
    if limit is None:
        yield 0, len(numels)
        return
    lo, total = 0, 0
    for i, n in enumerate(numels):
        total += n
        if total >= limit:
            yield lo, i + 1
            lo, total = i + 1, 0
    if lo < len(numels):
        yield lo, len(numels)


# ---------------------------------------------------------------------------------------------------------
# Flatten / cast / unscale / norm (issue 3). Same contracts as the kernels in kernels/flatten.py, cast.py and
# scale.py; none of these reads a device value on the host.


def flatten_layout(numels: Sequence[int], align: int) -> tuple[list[int], list[int], int]:
    """Offsets, spans and total length of ``fused_ops.flatten``'s buffer: tensor ``i`` starts at
    ``offsets[i]`` (a multiple of ``align``) and owns ``spans[i]`` elements (its size rounded up to
    ``align``; the tail is zero padding)."""
    offsets, spans, total = [], [], 0
    for n in numels:
        span = -(-int(n) // align) * align
        offsets.append(total)
        spans.append(span)
        total += span
    return offsets, spans, total


def flatten_into_(flat: Tensor, tensors: Sequence[Tensor], offsets: Sequence[int], spans: Sequence[int]) -> None:
    """``flat[offsets[i] : offsets[i] + spans[i]]`` = tensor i's elements, then zeros (the padding)."""
    if _packed_from_zero(offsets, spans) and len({x.dtype for x in tensors}) == 1 and tensors[0].dtype == flat.dtype:
        # Segments back to back from 0 (fused_ops.flatten's layout): one torch.cat into flat, gaps from one zero
        # buffer. On CPU this is 2-3x faster than a view per segment and a multi-tensor copy.
        pad = max(span - x.numel() for x, span in zip(tensors, spans))
        zeros = flat.new_zeros(pad) if pad else None
        pieces = []
        for x, span in zip(tensors, spans):
            n = x.numel()
            if n:
                pieces.append(x if x.dim() == 1 else x.reshape(-1))
            if span > n:
                pieces.append(zeros[: span - n])
        if pieces:
            torch.cat(pieces, out=flat.narrow(0, 0, offsets[-1] + spans[-1]))
        return
    dst, src, gaps = [], [], []
    for x, off, span in zip(tensors, offsets, spans, strict=True):
        n = x.numel()
        if n:
            dst.append(flat.narrow(0, off, n))
            src.append(x.reshape(-1))
        if span > n:
            gaps.append(flat.narrow(0, off + n, span - n))
    if dst:
        torch._foreach_copy_(dst, src)
    if gaps:
        torch._foreach_zero_(gaps)


def _packed_from_zero(offsets: Sequence[int], spans: Sequence[int]) -> bool:
    """Whether segment ``i`` starts where segment ``i - 1`` ends, the first at 0 (and there is one)."""
    if not offsets or offsets[0] != 0:
        return False
    end = 0
    for off, span in zip(offsets, spans):
        if off != end:
            return False
        end += span
    return True


def unflatten_copy_(tensors: Sequence[Tensor], flat: Tensor, offsets: Sequence[int]) -> None:
    """``tensors[i]`` = ``flat[offsets[i] : offsets[i] + numel]``, reshaped (the scatter back)."""
    dst = [x for x in tensors if x.numel()]
    src = [flat.narrow(0, off, x.numel()).view(x.shape) for x, off in zip(tensors, offsets, strict=True) if x.numel()]
    if dst:
        torch._foreach_copy_(dst, src)


def _stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """fp32 ``x`` rounded to bf16/fp16 stochastically (unbiased), as ``kernels/cast.py`` documents: bf16 adds 16
    random bits to the fp32 pattern and truncates; fp16 rounds in fixed point on the fp16 grid of x's binade."""
    bits = x.view(torch.int32)
    rnd = torch.randint(0, 2**24, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    if dtype == torch.bfloat16:
        rounded = ((bits + (rnd & 0xFFFF)) & -65536).view(torch.float32)
        return torch.where(torch.isnan(x), x, rounded).to(dtype)
    e = (((bits >> 23) & 0xFF) - 127).clamp_min(-14)
    ulp = torch.ldexp(torch.ones_like(x), (e - 10).to(torch.float32))
    q = x.abs() * torch.ldexp(torch.ones_like(x), (10 - e).to(torch.float32))
    low = q.floor()
    up = (rnd.to(torch.float32) * 2.0**-24) < (q - low)
    rounded = torch.copysign((low + up.to(torch.float32)) * ulp, x)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


def cast_(dst: Sequence[Tensor], src: Sequence[Tensor], stochastic: bool = False, seed: int | None = 0) -> None:
    """``dst[i] = src[i]`` converted to ``dst[i]``'s dtype: torch's ``.to()`` (round to nearest even) or, with
    ``stochastic`` and a bf16/fp16 destination, unbiased stochastic rounding seeded by ``seed`` (the random
    stream differs from the kernel's; the distribution is the same), or drawn from torch's default generator of
    the device when ``seed`` is None (graph-safe, nothing read on the host). Any float dtypes."""
    if not stochastic:  # one multi-tensor copy: torch's .to() rounding (shapes were checked by the caller)
        pairs = [(d, s) for d, s in zip(dst, src, strict=True) if d.numel()]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s if s.shape == d.shape else s.reshape(d.shape)
                                                         for d, s in pairs])  # fmt: skip
        return
    generator = None
    rounded_dst, rounded = [], []  # (every rounded value is computed before the first write: an error part-way
    plain_dst, plain_src = [], []  # leaves every dst as it was)
    for d, s in zip(dst, src, strict=True):
        if stochastic and d.dtype in (torch.bfloat16, torch.float16) and s.dtype != d.dtype and d.numel():
            if seed is not None and (generator is None or generator.device != d.device):
                generator = torch.Generator(device=d.device)
                generator.manual_seed(seed)
            rounded_dst.append(d)
            rounded.append(_stochastic_round(s.to(torch.float32).reshape(d.shape), d.dtype, generator))
        elif d.numel():
            plain_dst.append(d)
            plain_src.append(s.reshape(d.shape))
    for d, value in zip(rounded_dst, rounded):
        d.copy_(value)
    if plain_dst:
        torch._foreach_copy_(plain_dst, plain_src)  # one multi-tensor copy: torch's .to() rounding


def unscale_(
    grads: Sequence[Tensor],
    inv_scale: float | Tensor,
    found_inf: Tensor | None,
    out: Sequence[Tensor] = (),
) -> None:
    """``y = grad * inv_scale`` computed in fp32 (float64 when a grad or output is float64), stored in the grad
    or in ``out[i]``; ``found_inf`` is set to 1 if any stored ``y`` is inf or nan (never cleared). All device
    ops: no host sync."""
    # Everything that allocates runs before the first write (an out-of-memory error leaves the grads, the outputs
    # and found_inf as they were), and nothing allocates after it.
    if not out and grads and all(g.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in grads):
        # In place, torch's own one-pass kernel (what GradScaler.unscale_ runs): it flags non-finite inputs.
        # A finite grad can only become inf when inv_scale > 1: then the stored values are checked as well.
        nonempty = [g for g in grads if g.numel()]
        if not nonempty:
            return
        device = nonempty[0].device
        inv = inv_scale.to(device, torch.float32).reshape(1) if isinstance(inv_scale, Tensor) else None
        inv = inv if inv is not None else torch.full((1,), float(inv_scale), device=device)
        flag = torch.zeros(1, device=device)
        # (the same kernel with a scale of 1 checks the stored values: x * 1 is exact)
        one = torch.ones(1, device=device) if isinstance(inv_scale, Tensor) or float(inv_scale) > 1.0 else None
        commit = _found_inf_setter(found_inf, flag)
        torch._amp_foreach_non_finite_check_and_unscale_(nonempty, flag, inv)
        if one is not None:
            torch._amp_foreach_non_finite_check_and_unscale_(nonempty, flag, one)
        commit()
        return
    outs = list(out) if out else list(grads)
    results, bad = [], []
    for g, o in zip(grads, outs, strict=True):
        compute = torch.float64 if torch.float64 in (g.dtype, o.dtype) else torch.float32
        inv = inv_scale.to(o.device, compute).reshape(()) if isinstance(inv_scale, Tensor) else float(inv_scale)
        y = (g.to(compute) * inv).to(o.device, o.dtype)  # (what o will hold: its own dtype's inf counts)
        results.append(y)
        if found_inf is not None and o.numel():
            bad.append(~torch.isfinite(y).all())
    commit = None
    if found_inf is not None and bad:
        commit = _found_inf_setter(found_inf, torch.stack([b.to(found_inf.device) for b in bad]).any())
    for o, y in zip(outs, results, strict=True):
        o.copy_(y)
    if commit is not None:
        commit()


def _found_inf_setter(found_inf: Tensor | None, flag: Tensor):
    """A function that sets ``found_inf`` to 1 where ``flag`` (1 element, or 0-d, on any device) is nonzero, else
    leaves it, as torch's ``_amp_foreach_non_finite_check_and_unscale_`` does (it stores exactly 1.0, not
    ``max(found_inf, 1)``: a flag holding 5 or nan becomes 1, and never clears it). A device op, no host sync, and
    it allocates nothing when called: its scratch is allocated here, before the caller writes anything. ``flag``
    is read when the function is called."""
    if found_inf is None:
        return lambda: None
    flag = flag.reshape(found_inf.shape)
    found = torch.empty(found_inf.shape, dtype=torch.bool, device=found_inf.device)

    def commit() -> None:
        found.copy_(flag)  # (nonzero: True)
        found_inf.masked_fill_(found, 1.0)

    return commit


def grad_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all elements of ``tensors`` together (as if concatenated), accumulated in
    float64; a 0-d float32 tensor (float64 when a tensor is float64) on the first tensor's device. For a p other
    than 1, 2 and inf the elements are divided by the largest |x| first (the root is multiplied by it), as the
    kernel does: the p-th powers neither overflow nor underflow where the norm does not (torch's float64 sum of
    p-th powers gives inf for ``[1e30, 1e30]`` with p = 100)."""
    if len(tensors) == 0:
        return torch.zeros(())
    device = tensors[0].device
    out_dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    nonempty = [x for x in tensors if x.numel()]  # the inf norm of an empty tensor is undefined in torch
    if not nonempty:
        return torch.zeros((), dtype=out_dtype, device=device)
    if norm_type in (1.0, 2.0) or math.isinf(norm_type):
        norms = torch._foreach_norm(nonempty, norm_type, dtype=torch.float64)
        if len({x.device for x in nonempty}) > 1:
            norms = [n.to(device) for n in norms]
        return torch.linalg.vector_norm(torch.stack(norms), norm_type).to(out_dtype)
    m = torch.stack([torch.linalg.vector_norm(x, math.inf, dtype=torch.float64).to(device) for x in nonempty]).max()
    scale = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))  # (0, inf, nan: unscaled, as they are)
    norms = [torch.linalg.vector_norm(x.to(torch.float64) / scale.to(x.device), norm_type).to(device) for x in nonempty]
    return (torch.linalg.vector_norm(torch.stack(norms), norm_type) * scale).to(out_dtype)


# SGD and Lion (their own file, re-exported here: every op's reference is reachable as ``fused_ops.reference.*``).
from ._ref_sgd_lion import lion_, sgd_  # noqa: E402,F401
