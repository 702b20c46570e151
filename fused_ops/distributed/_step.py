"""The step: make the grad shards final, agree and take the global grad norm in one all-reduce, unscale and clip
in one device-side factor, the fused Adam op on this rank's shards, and the all-gather of the params."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _cpu_lowbit, functional
from .._backend import no_autocast
from .._ref_lowbit import QUANT_BLOCK, n_scales
from ..kernels._checks import NoUserCode
from ._agree import _ERROR_TYPES, _out_of_step_message, _StepInputs
from ._comm import _all_gather
from ._layout import _Bucket, _Segment

_GATHER_COMPLETED = (
    "ZeroAdamW.step: the previous step's all-gather of the params failed, after its update was applied to the "
    "shards: the params were gathered now, from the updated shards, and this call took no step (its closure was "
    "not run, the grads are as they were). The previous step counts once: do not call step() again for its grads "
    "(call zero_grad() and run the next backward first)"
)


@dataclass
class _PostBuffers:
    """What the step writes after the ranks agreed, allocated before (``_StepMixin._post_buffers``)."""

    divisor: float | Tensor  # world_size, or loss_scale * world_size (a 0-d float64 tensor where that is one)
    norm64: Tensor  # the global grad norm, float64
    norm: Tensor  # the same in float32: the new ``last_grad_norm``
    clip: tuple[Tensor, Tensor] | None  # with max_grad_norm: the clip coefficient in float32 and float64
    grad_scale: Tensor  # what the fused op divides the grads by
    found_inf: Tensor  # the new ``last_found_inf`` (zeros without a loss scale)
    inf64: Tensor | None  # scratch of the overflow flag (with a loss scale)
    flag: Tensor | None  # a loss scaler's found_inf as a bool, on its device
    amsgrad: list[tuple[_Bucket, Tensor]]  # the max_exp_avg_sq shards amsgrad groups need (zeros)
    masters: list[tuple[Tensor, Tensor]]  # (master segment, its new value) of params written since: _refreshed_masters
    versions: list[int]  # the params' version counters these were computed at


class _StepMixin:
    """``step()`` and the fused Adam update of this rank's shards."""

    # Under torch.compile the step runs eagerly behind a graph break: it is collectives, an agreement read on the
    # host and launches on flat shards, nothing a graph fuses; traced, the update's shard views came out empty on one
    # rank after the ranks had agreed, which left the other rank waiting in the all-gather.
    @torch.compiler.disable
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss_scale: float | Tensor | Any = None, **unexpected: Any
    ) -> Any:
        """Reduce grads, clip, unscale, update this rank's shard with the fused Adam op, all-gather the params.

        Args:
            closure: re-evaluates the model and returns the loss (as torch.optim).
            loss_scale: the factor the loss was multiplied by before backward: a float, a 1-element device
                tensor, or a loss scaler with ``scale`` and ``found_inf`` tensors (``fused_ops.DynamicLossScaler``).
                Grads are divided by it inside the fused step, and a step whose grads hold an inf or NaN on
                any rank is skipped on every rank (params, moments and step counts unchanged); ``last_found_inf``
                then holds 1, and a scaler's ``found_inf`` is set too, so that ``scaler.update()`` follows the
                global decision on every rank.

        After the step, ``last_grad_norm`` holds the global L2 norm of the averaged, unscaled grads before
        clipping, and ``skipped_steps`` counts skipped steps (both device tensors). Without ``loss_scale``
        nothing is skipped: inf/NaN grads go into the update, as with torch.optim.

        Checked before anything changes, on every rank: the step values of every param group (lr, betas, eps,
        weight_decay; a tensor lr must be 1-element and floating point, its value is checked on the device),
        each group's backend (``"triton"`` on CPU tensors needs the Triton interpreter), ``max_grad_norm``,
        ``loss_scale`` (finite and > 0; a tensor or a scaler's ``scale`` and ``found_inf`` 1-element and floating
        point), that a tensor lr, loss_scale, scale or found_inf shares no memory with the params, shards, staging
        buffers, step counts or ``skipped_steps`` this optimizer writes (nor found_inf with the others), the grads
        (plain dense tensors with memory of their own, the param's shape, dtype and device) and that every param is
        still a view of its bucket; and that every rank steps with bit-identical values (lr, betas, eps,
        weight_decay, amsgrad, maximize, max_grad_norm, loss_scale). A problem on any rank raises the same exception
        on every rank, and leaves params, grads, moments, master weights, step counts, the scaler and the logged
        values as they were.
        The check rides on the all-reduce of the grad norm (no extra collective); reading its outcome is the
        step's one host synchronisation (torch's GradScaler syncs once per step too). An exception on this rank
        before that all-reduce (out of memory, say) is agreed on the same way (this rank raises its own exception);
        what the step needs after it is allocated before it. If the final all-gather of the params fails (on every
        rank) after the shards were updated, the next call completes it, takes no step and raises a RuntimeError.
        """
        if self._gather_pending:  # (set on every rank alike: the last step's all-gather failed on every rank)
            self._gather_params()
            raise RuntimeError(_GATHER_COMPLETED)
        out_of_step = getattr(self, "_out_of_step", False)
        if out_of_step:  # (set on every rank alike, to its message: no collective to wait in)
            raise RuntimeError(out_of_step)
        loss = None
        closure_error: Exception | None = None
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except Exception as e:  # noqa: BLE001 - agreed on (the other ranks would wait in the step), re-raised
                closure_error = e
        # (no user code from the first check to the last launch and the params' all-gather, as in FusedAdamW's step:
        # torch function and dispatch modes, the cyclic garbage collector; see NoUserCode; probe 77)
        with NoUserCode():
            return self._step_checked(loss, closure_error, loss_scale, unexpected)

    def _step_checked(self, loss: Any, closure_error: Exception | None, loss_scale: Any,
                      unexpected: dict[str, Any]) -> Any:  # fmt: skip
        """``step()`` after its closure: the checks, the agreement, the update and the all-gather."""
        error: Exception | None = None
        inputs: _StepInputs | None = None
        post: _PostBuffers | None = None
        unreduced = False
        if closure_error is not None:
            error = RuntimeError(f"the closure raised {type(closure_error).__name__}: {closure_error}")
        else:
            try:
                unreduced = self._check_layout()
                inputs = self._step_inputs(loss_scale, unexpected)
                # What the step needs after the ranks agreed, allocated now: after the agreement only collectives
                # and in-place ops run here (a rank failing alone there would leave the others in the all-gather).
                post = self._post_buffers(inputs)
            except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
                error = e
        if closure_error is not None and not self._buckets:
            raise closure_error
        if not self._buckets:  # no params on any rank (checked at construction): no collective, nothing to change
            if error is not None:
                raise error
            return loss
        if not self._round_header_ok():  # the ranks paired this rank's last pass with a step: they raise too
            n_passes, n_zeroed = self._round_mismatch
            self._round_mismatch = False
            self._out_of_step = _out_of_step_message(n_passes, n_zeroed, self.world_size)
            raise RuntimeError(self._out_of_step)
        if self.stage == 2 and self._grad_errors:
            self._forget_fixed_grads()  # (a refused grad given memory, or None, since: see there)
        self._note_hand_set_grads()  # (stage 2: grads set by hand over held grads replace them, as in torch)
        zeroed = self._zeroed_before_step()
        had_pass = self.stage == 2 and self._rounds_since_step > 0
        self._stood_in = False
        self._reduce_faults = []  # (what this rank's reductions meet is agreed on: see _launch)
        undo = self._reduce_all()
        late_undo = None  # a stand-in's late reduction (into new shards): a failed step puts it back
        drop: frozenset = frozenset()
        try:
            agreed = self._agree_on_step(
                [b.grad for b in self._buckets], inputs, self._first_error(error), zeroed, unreduced, had_pass,
                bool(self._replaced), fault=self._reduce_fault(), zeroed_since_step=self._zeroed_since_step(),
            )  # fmt: skip
            if agreed is None:
                # Every rank called zero_grad() after its last synced pass and other ranks began a new one (a batch
                # discarded on every rank, then no backward on this rank): its passes count for nothing, and this rank
                # stands in for the new one as a rank without a backward does. Its reduction pairs with that pass's
                # reduce-scatters (into the new shards of _reduce_all above: a failed step keeps it as this rank's
                # pass, see _keep_stand_in_pass), then it agrees with those ranks' step.
                self._stood_in = True
                self._rounds_since_step = 0
                self._zeroed = False
                undo = self._reduce_all(undo=undo)
                agreed = self._agree_on_step(
                    [b.grad for b in self._buckets], inputs, self._first_error(error), False, False, False,
                    bool(self._replaced), fault=self._reduce_fault(),
                )  # fmt: skip
            sumsq, late, replacing = agreed
            conflict = None
            if replacing:  # agreed: the params whose reduced grads every rank drops (grads set by hand replace them)
                drop, conflict = self._agree_on_drops()
            if late or drop:  # agreed: every rank reduces the grads its shards lack, then agrees again (on grad errors)
                only_drop = not late  # (only the buckets of the dropped params: the others are final)
                if self._stood_in:
                    late_undo = self._reduce_all(late=True, drop=drop, only_drop=only_drop)
                else:
                    undo = self._reduce_all(late=True, undo=undo, drop=drop, only_drop=only_drop)
                sumsq, _, _ = self._agree_on_step(
                    [b.grad for b in self._buckets], inputs, self._first_error(error), False, False,
                    fault=self._reduce_fault(),
                )  # fmt: skip
            if conflict is not None:  # (agreed: the same on every rank)
                raise RuntimeError(conflict)
        except BaseException:
            fault = self._reduce_fault()
            self._reduce_faults = None
            if self._stood_in:  # this rank's reduction paired with another rank's synced pass: it is this rank's pass
                # (but not the late one, which every other rank puts back: the retry runs it again)
                self._undo_reduce(late_undo)
                self._keep_stand_in_pass()
            else:
                self._undo_reduce(undo)
            if closure_error is not None:  # (its own exception on the rank whose closure raised, as torch.optim)
                raise closure_error  # noqa: B904 - the agreed error is its context
            if fault is not None:  # (and on the rank that met a problem in its reductions)
                raise fault  # noqa: B904
            raise
        self._reduce_faults = None
        assert inputs is not None and post is not None
        self._commit_reduce(undo, drop)
        with no_autocast():  # (the step computes in the dtypes it chose, as FusedAdamW's)
            self._update(sumsq, inputs, post)
        self._gather_pending = True  # (until the all-gather below completes: see _gather_params)
        self._gather_params()
        return loss

    def _reduce_fault(self) -> Exception | None:
        faults = self._reduce_faults
        return faults[0] if faults else None

    def _post_buffers(self, inputs: _StepInputs) -> _PostBuffers:
        """Everything the step allocates after the ranks agree, allocated before (see ``_update``)."""
        dev = self._device
        divisor: float | Tensor = float(self.world_size)
        if inputs.loss_scale is not None:
            divisor = inputs.loss_scale * self.world_size
        clip = None
        if inputs.max_grad_norm is not None:
            clip = (torch.empty((), dtype=torch.float32, device=dev), torch.empty((), dtype=torch.float64, device=dev))
        flag = inputs.scaler_found_inf
        amsgrad = [(b, torch.zeros_like(b.exp_avg, dtype=torch.float32)) for b in self._buckets
                   if inputs.flags[b.group][0] and b.max_exp_avg_sq is None]  # fmt: skip
        masters, versions = self._refreshed_masters()
        return _PostBuffers(
            divisor=divisor,
            norm64=torch.empty((), dtype=torch.float64, device=dev),
            norm=torch.empty((), dtype=torch.float32, device=dev),
            clip=clip,
            grad_scale=torch.empty(1, dtype=torch.float32, device=dev),
            found_inf=torch.zeros(1, dtype=torch.float32, device=dev),
            inf64=torch.empty((), dtype=torch.float64, device=dev) if inputs.loss_scale is not None else None,
            flag=None if flag is None else torch.empty(flag.shape, dtype=torch.bool, device=flag.device),
            amsgrad=amsgrad,
            masters=masters,
            versions=versions,
        )

    def _update(self, sumsq: Tensor, inputs: _StepInputs, post: _PostBuffers) -> None:
        """After the ranks agreed: unscale and clip in one factor, the fused Adam op on this rank's shards. In-place
        ops into ``post`` (the same values, bit for bit, as ``sumsq.sqrt() / divisor`` and so on)."""
        for master, value in post.masters:  # (writes into the params since the last step: see _refreshed_masters)
            master.copy_(value)
        self._param_versions = post.versions
        # One all-reduce gave both the global norm and the overflow flag (inf/NaN propagate through the sum).
        divisor = post.divisor
        total_norm = post.norm64.copy_(sumsq).sqrt_().div_(divisor)
        self.last_grad_norm = post.norm.copy_(total_norm)
        grad_scale = post.grad_scale
        if post.clip is not None:
            # torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1; folded into the divisor.
            coef, coef64 = post.clip
            coef.copy_(post.norm).add_(1e-6).reciprocal_().mul_(inputs.max_grad_norm).clamp_(max=1.0)
            coef64.copy_(coef)
            if isinstance(divisor, Tensor):
                torch.div(divisor, coef64, out=coef64)
            else:
                coef64.reciprocal_().mul_(divisor)
            grad_scale.copy_(coef64)
        elif isinstance(divisor, Tensor):
            grad_scale.copy_(divisor)
        else:
            grad_scale.fill_(divisor)
        found_inf = post.found_inf
        if post.inf64 is not None:
            post.inf64.copy_(sumsq).sub_(post.inf64)  # 0 where finite, NaN where inf or NaN
            found_inf.copy_(post.inf64).ne_(found_inf)  # (1.0 where NaN)
            self.last_found_inf = found_inf.reshape(())
            self.skipped_steps += self.last_found_inf
            flag = inputs.scaler_found_inf
            if flag is not None:  # = 1.0 where the step is skipped, else as it was (as torch's GradScaler sets it)
                flag.masked_fill_(post.flag.copy_(self.last_found_inf), 1.0)
            step_found_inf: Tensor | None = found_inf
        else:
            self.last_found_inf = found_inf.reshape(())  # (zeros)
            step_found_inf = None

        for b, buf in post.amsgrad:
            b.max_exp_avg_sq = buf
            self._adam_view_cache.clear()
        for gi in range(len(self.param_groups)):
            # Segments with an fp32 master (bf16/fp16 buckets) and without (fp32, or master_weights=False) are
            # two calls: with masters, one pass updates them in fp32 and writes the rounded params.
            for with_master in (False, True):
                segs = [s for s in self._segments[gi] if (s.bucket.master is not None) == with_master]
                if segs:
                    lr, floats, backend = inputs.lrs[gi], inputs.floats[gi], inputs.backends[gi]
                    self._adam(inputs.flags[gi], segs, lr, floats, backend, grad_scale, step_found_inf,
                               (gi, with_master))  # fmt: skip
        # Params with no element on this rank still count the step, as their owners do.
        others = [self._steps[i] for i in self._unowned]
        if others:
            torch._foreach_add_(others, 1)
            if step_found_inf is not None:
                torch._foreach_sub_(others, [step_found_inf.reshape(())] * len(others))

    def _refreshed_masters(self) -> tuple[list[tuple[Tensor, Tensor]], list[int]]:
        """The fp32 master shard of a bf16/fp16 param is the truth the step updates, and the all-gather overwrites
        the param with it rounded: a write into the param since the last step (``model.load_state_dict`` after this
        optimizer was built, an in-place re-init) would be lost. Such a write moves the param's version counter (its
        own: the all-gather writes the flat buffer, not through the param), so in this rank's master segment of every
        param whose version moved since construction, the last step or the last ``load_state_dict``, each element
        that no longer equals the master rounded takes the param's value. The new values are computed here, with
        what the step allocates before the ranks agree (no host sync), and copied in after the agreement (``_update``:
        in place, so that no rank can fail alone there). fp32 params are their own masters. Writes through ``p.data``
        (a version counter of its own) are not seen. Returns the (master segment, new value) pairs and the versions
        they were computed at."""
        now = [p._version for p in self._params]
        if now == self._param_versions:
            return [], now
        out = []
        for i, (a, b) in enumerate(zip(now, self._param_versions, strict=True)):
            seg = self._segment_of.get(i) if a != b else None
            if seg is not None and seg.bucket.master is not None:
                n = seg.hi - seg.lo
                master = seg.bucket.master.narrow(0, seg.start, n)
                param = seg.bucket.param_shard.narrow(0, seg.start, n)
                written = param.ne(master.to(param.dtype))  # (an element written with its own value keeps the master)
                out.append((master, torch.where(written, param.to(torch.float32), master)))
        return out, now

    def _gather_params(self) -> None:
        """The all-gather of the params from the shards. ``_gather_pending`` is set before (by ``step()``, once the
        shards are updated) and cleared once it has completed: should it fail (on every rank: a collective that
        fails on some ranks only leaves the process group broken anyway), the update stays applied to the shards,
        and the next ``step()`` completes the gather from them (no second update) and raises."""
        try:
            works = []
            for b in self._buckets:
                works.append(_all_gather(b.param_flat, b.param_shard, self.process_group, async_op=self.overlap_comm))
            for w in works:
                if w is not None:
                    w.wait()
        except Exception as e:
            e.add_note(
                "ZeroAdamW.step: the step's update was applied to this rank's shards but the params' all-gather "
                "failed: the next step() completes the all-gather (it takes no step and raises)"
            )
            raise
        self._gather_pending = False
        if self.stage == 2:
            self._register_hooks()  # params unfrozen since construction

    def _first_error(self, error: Exception | None) -> Exception | None:
        """This rank's error for the agreement: the step's own, else the first grad problem the reduction found."""
        if error is None and self._grad_errors:
            kind, msg = self._grad_errors[min(self._grad_errors)]
            error = _ERROR_TYPES[kind](msg)
        return error

    def _adam_views(self, key: tuple, segs: list[_Segment]) -> tuple[list[Tensor], ...]:
        """Per-segment views of the shards (cached: same addresses every step, so the kernel's table is too).

        ``(params, masters, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, exp_avg_scales,
        exp_avg_sq_scales)``; the scales (int8 states) are each segment's blocks: a segment starts on a block of
        its shard (align is a multiple of 256), and its ceil(n / 256) blocks are its param's own."""
        cached = self._adam_view_cache.get(key)
        if cached is not None:
            return cached
        views: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [], [], [])
        params, masters, grads, ms, vs, maxvs, steps, m_scales, v_scales = views
        for s in segs:
            n, b = s.hi - s.lo, s.bucket
            params.append(b.param_shard.narrow(0, s.start, n))
            if b.master is not None:
                masters.append(b.master.narrow(0, s.start, n))
            grads.append(b.grad.narrow(0, s.start, n))
            ms.append(b.exp_avg.narrow(0, s.start, n))
            vs.append(b.exp_avg_sq.narrow(0, s.start, n))
            if b.max_exp_avg_sq is not None:
                maxvs.append(b.max_exp_avg_sq.narrow(0, s.start, n))
            if b.exp_avg_scale is not None:
                m_scales.append(b.exp_avg_scale.narrow(0, s.start // QUANT_BLOCK, n_scales(n)))
                v_scales.append(b.exp_avg_sq_scale.narrow(0, s.start // QUANT_BLOCK, n_scales(n)))
            steps.append(self._steps[s.index])
        self._adam_view_cache[key] = views
        self._lowbit_tables[key] = {}  # new views, new addresses: the old chunk tables go with the old views
        return views

    def _adam(self, flags: tuple[bool, bool], segs: list[_Segment], lr: float | Tensor,
              floats: tuple[float, float, float, float], backend: str, grad_scale: Tensor, found_inf: Tensor | None,
              key: tuple[int, bool]) -> None:  # fmt: skip
        """The fused Adam op over the given segments of this rank's shards (one launch per dtype), with the step
        values ``step()`` checked (``floats``: beta1, beta2, eps, weight_decay; ``flags``: amsgrad, maximize;
        ``backend``: the group's, resolved for the params' device by the checks the ranks agreed on)."""
        if self.state_dtype != "fp32":
            for dtype in dict.fromkeys(s.bucket.dtype for s in segs):  # the low-bit launch takes one param dtype
                part = [s for s in segs if s.bucket.dtype == dtype]
                self._adam_lowbit(flags[1], part, lr, floats, backend, grad_scale, found_inf, (*key, dtype))
            return
        # Grad shards are the params' dtype or fp32; the op takes both as they are, divides by grad_scale in fp32
        # (in the Triton kernel, or into fp32 copies on the CPU path) and leaves the shards as reduced.
        params, masters, grads, ms, vs, maxvs, steps, _, _ = self._adam_views(key, segs)
        beta1, beta2, eps, weight_decay = floats
        amsgrad, maximize = flags
        functional.adam_(
            params, grads, ms, vs, maxvs if amsgrad else None, steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
            grad_scale=grad_scale, found_inf=found_inf, master_params=masters or None, backend=backend,
        )  # fmt: skip

    def _lowbit_seed(self, key: tuple[int, bool, torch.dtype]) -> int:
        """The Philox key of one low-bit launch: tensor indices restart at 0 in each launch, so each (param group,
        masters or not, param dtype) launch gets a key of its own (as FusedAdamW derives its keys)."""
        gi, with_master, dtype = key
        dtype_index = (torch.float32, torch.bfloat16, torch.float16).index(dtype)
        return (self.seed + 7919 * gi + 104729 * dtype_index + 1299709 * int(with_master)) % 2**31

    def _adam_lowbit(self, maximize: bool, segs: list[_Segment], lr: float | Tensor,
                     floats: tuple[float, float, float, float], backend: str, grad_scale: Tensor,
                     found_inf: Tensor | None, key: tuple[int, bool, torch.dtype]) -> None:  # fmt: skip
        """The low-bit Adam step (``kernels/adam_lowbit.py``, or ``_cpu_lowbit.adam_lowbit_cpu_`` on the reference
        backend) over segments of one param dtype: each segment is one tensor of the launch, with its own step
        count and, for int8 states, its own blocks of the shard's scales."""
        params, masters, grads, ms, vs, _, steps, m_scales, v_scales = self._adam_views(key, segs)
        beta1, beta2, eps, weight_decay = floats
        state = {"int8": "int8", "bf16": "bf16"}[self.state_dtype]
        kwargs = dict(
            exp_avg_scales=m_scales, exp_avg_sq_scales=v_scales, master_params=masters, state=state,
            seed=self._lowbit_seed(key), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            maximize=maximize, decoupled=True, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        if backend == "triton":
            from ..kernels.adam_lowbit import adam_lowbit_launch

            cache = self._lowbit_tables[key]
            with torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext():
                adam_lowbit_launch(params, grads, ms, vs, steps, cache=cache, **kwargs)
        else:
            _cpu_lowbit.adam_lowbit_cpu_(params, grads, ms, vs, steps, **kwargs)  # (the oracle's bits)

    def _ensure_amsgrad_buffers(self) -> None:
        for b in self._buckets:
            if self.param_groups[b.group]["amsgrad"] and b.max_exp_avg_sq is None:
                b.max_exp_avg_sq = torch.zeros_like(b.exp_avg, dtype=torch.float32)
                self._adam_view_cache.clear()
