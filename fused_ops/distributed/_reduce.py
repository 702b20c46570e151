"""Gradient reduction: the grad hooks (stage 2), the reduce-scatter of each bucket as soon as its grads exist
(in bucket order on every rank), ``no_sync`` accumulation, and making every grad shard final for ``step()``."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._comm import _reduce_scatter
from ._layout import _Bucket, _Slot

# The grad hook each param carries (at most one ZeroAdamW drives a param: the newest one built over it).
_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _ReduceMixin:
    """Reduce-scatters the grads into this rank's grad shards (see the module docstring)."""

    def _register_hooks(self) -> None:
        ref = weakref.ref(self)
        for b in self._buckets:
            for s in b.slots:
                if not s.param.requires_grad:
                    continue

                def hook(_p: Tensor, index: int = s.index) -> None:
                    opt = ref()
                    if opt is not None:
                        opt._on_grad_ready(index)

                old = _HOOKS.pop(s.param, None)
                if old is not None:  # an earlier ZeroAdamW over this param must not launch collectives any more
                    old.remove()
                handle = s.param.register_post_accumulate_grad_hook(hook)
                _HOOKS[s.param] = handle
                self._hook_handles.append(handle)
                b.n_hooked += 1

    # -- gradient reduction ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate grads locally (in ``p.grad``) in backward passes run inside; no communication.

        The next backward outside the context (or ``step()``) reduces the accumulated grads. In stage 1 grads
        are reduced in ``step()`` anyway, so this changes nothing there. Same as setting ``sync_grads``.
        """
        previous = self._sync_grads
        self._sync_grads = False
        try:
            yield
        finally:
            self._sync_grads = previous

    @property
    def sync_grads(self) -> bool:
        """False while grads are accumulated locally without communication (see :meth:`no_sync`)."""
        return self._sync_grads

    @sync_grads.setter
    def sync_grads(self, value: bool) -> None:
        self._sync_grads = bool(value)

    def _on_grad_ready(self, index: int) -> None:
        if not self._sync_grads:
            self._unsynced_grads = True
            return
        if not self._round_open:
            self._round_open = True
            self._unsynced_grads = False
            self._next_bucket = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._end_round)
        self._buckets[self._bucket_of[index]].ready.add(index)
        with torch.no_grad():
            while self._next_bucket < len(self._buckets):
                b = self._buckets[self._next_bucket]
                if len(b.ready) < b.n_hooked:
                    break
                self._launch(b)
                self._next_bucket += 1

    def _end_round(self) -> None:
        """End of a backward pass: reduce every bucket not reduced yet (zeros for params without grads)."""
        with torch.no_grad():
            while self._next_bucket < len(self._buckets):
                self._launch(self._buckets[self._next_bucket])
                self._next_bucket += 1
        self._round_open = False
        self._next_bucket = 0
        self._rounds_since_step += 1

    def _grad_error(self, s: _Slot, view: Tensor) -> tuple[str, str]:
        p, g = s.param, s.param.grad
        where = f"param {s.index} (shape {tuple(view.shape)})"
        if p.data_ptr() != s.ptr or p.dtype != self._buckets[self._bucket_of[s.index]].dtype or p.shape != view.shape:
            return "RuntimeError", (
                f"{where} is no longer a view of ZeroAdamW's flat buffer (its .data was replaced, or the model was "
                "moved or cast after the optimizer was built), so its updates would not reach it: build ZeroAdamW "
                "after the model has its final device and dtype"
            )
        if g.is_sparse:
            return "RuntimeError", f"ZeroAdamW does not support sparse gradients; the grad of {where} is sparse"
        if not g.is_floating_point():
            return "RuntimeError", f"the grad of {where} is {g.dtype}"
        return "RuntimeError", f"the grad of {where} has shape {tuple(g.shape)}"

    def _launch(self, b: _Bucket, free_grads: bool = True) -> None:
        """Copy the bucket's grads into a staging buffer and start its reduce-scatter (stage 2 frees the grads
        unless ``free_grads`` is False: step() frees them once it has succeeded)."""
        b.ready.clear()
        key = (self._reduce_dtype(b), self._device)
        pool = self._pools[key]
        while not pool.free:
            self._finish_oldest()
        si = pool.free.pop()
        flat = pool.flat[si].narrow(0, 0, b.numel)
        views = b.staging_views.get(si)
        if views is None:  # built once per (bucket, staging buffer): the launch path stays cheap on the host
            views = b.staging_views[si] = (
                [flat.narrow(0, lo, hi - lo) for lo, hi in b.gaps],
                [flat.narrow(0, s.offset, s.numel).view(s.param.shape) for s in b.slots],
            )
        dst, src, zero, bad = [], [], list(views[0]), False
        for s, view in zip(b.slots, views[1], strict=True):
            p = s.param
            g = p.grad
            if (
                p.data_ptr() != s.ptr
                or p.dtype != b.dtype
                or p.shape != view.shape
                or (g is not None and (g.shape != view.shape or g.is_sparse or not g.is_floating_point()))
            ):
                # Never raised here (only this rank would, mid-sequence of collectives): reduced as zeros, and
                # step() raises the error on every rank.
                self._grad_errors.setdefault(s.index, self._grad_error(s, view))
                zero.append(view)
                bad = True
            elif g is None:
                zero.append(view)
            else:
                dst.append(view)
                src.append(g)
        if dst:
            torch._foreach_copy_(dst, src)
        if zero:
            torch._foreach_zero_(zero)
        if self.stage == 2 and free_grads:
            for s in b.slots:
                if not bad or s.index not in self._grad_errors:
                    s.param.grad = None
        # Straight into the grad shard when nothing is there yet (and the dtypes agree); otherwise in place (into
        # this rank's slice of the staging buffer: NCCL and gloo support it), added to the shard when it lands.
        direct = key[0] == b.grad.dtype and not b.grad_valid and b.inflight == 0
        out = b.grad if direct else flat.narrow(0, self.rank * b.shard_numel, b.shard_numel)
        work = _reduce_scatter(out, flat, self.process_group, async_op=True)
        b.inflight += 1
        self._inflight.append((b, pool, si, out, direct, work))
        if not self.overlap_comm:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        b, pool, si, out, direct, work = self._inflight.popleft()
        work.wait()
        if not direct:
            if b.grad_valid:
                b.grad.add_(out)
            else:
                b.grad.copy_(out)
        b.grad_valid = True
        b.inflight -= 1
        pool.free.append(si)

    def _drain(self) -> None:
        if self._round_open:  # a backward pass that failed half-way: finish its round so ranks stay in step
            self._end_round()
        while self._inflight:
            self._finish_oldest()

    def _reduce_all(self) -> tuple | None:
        """Make every bucket's grad shard final for this step.

        Returns what a failed step puts back (see ``_undo_reduce``), None when there is nothing to put back: stage
        1 recomputes its shards from ``p.grad`` at every step, and in stage 2 after a synced backward they are
        final already.
        """
        self._drain()
        undo = None
        if self.stage == 1 or self._rounds_since_step == 0 or self._unsynced_grads:
            # Stage 1, or stage 2 without a synced backward since the last step (grads set by hand, or
            # accumulated under no_sync after the last synced backward): reduce what p.grad holds now. Stage 1's
            # p.grad holds the whole accumulation, so its shards are replaced, not added to.
            if self.stage == 1:
                self._grad_errors.clear()
                for b in self._buckets:
                    b.grad_valid = False
            else:
                # Into new shards, and p.grad is kept until the step succeeds: a failed step puts the old shards
                # back and leaves p.grad as it was, so that nothing is reduced twice.
                undo = ([(b, b.grad, b.grad_valid) for b in self._buckets], dict(self._grad_errors))
                for b in self._buckets:
                    b.grad = b.grad.clone() if b.grad_valid else torch.empty_like(b.grad)
                self._adam_view_cache.clear()
            with torch.no_grad():
                for b in self._buckets:
                    self._launch(b, free_grads=False)
            self._drain()
        for b in self._buckets:
            if not b.grad_valid:
                b.grad.zero_()
                b.grad_valid = True
        return undo

    def _undo_reduce(self, undo: tuple | None) -> None:
        if undo is None:
            return
        shards, errors = undo
        for b, grad, valid in shards:
            b.grad, b.grad_valid = grad, valid
        self._grad_errors = errors
        self._adam_view_cache.clear()

    def _commit_reduce(self, undo: tuple | None) -> None:
        self._rounds_since_step = 0
        self._unsynced_grads = False
        if undo is not None:  # stage 2 reduced p.grad in step(): free it now, as backward would have
            for p in self._params:
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset grads: ``p.grad`` (as torch) and this rank's reduced-grad shards."""
        self._drain()
        for p in self._params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()
        for b in self._buckets:
            b.grad_valid = False
        self._rounds_since_step = 0
        self._unsynced_grads = False
        self._grad_errors.clear()
