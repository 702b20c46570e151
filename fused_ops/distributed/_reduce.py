"""Gradient reduction: the grad hooks (stage 2), the reduce-scatter of each bucket as soon as its grads exist
(in bucket order on every rank), ``no_sync`` accumulation, and making every grad shard final for ``step()``."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from .._validate import has_memory, outside_storage
from ._comm import _reduce_scatter
from ._layout import _Bucket, _bucket_moved, _Slot, _slot_moved


class _ById:
    """A mapping keyed by tensors' identities that holds no weak reference to them: ``torch.utils.swap_tensors``, which
    ``nn.Module`` conversions call under ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses a
    tensor that has one ("Cannot swap t1 because it has weakref associated with it"), so a ``WeakIdKeyDictionary``
    over the params made every such conversion fail, no-ops (``model.float()`` of an fp32 model) included. An entry
    holds its tensor (its id stays its own while the entry is there) and is dropped by whoever added it."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, Any]] = {}

    def __contains__(self, t: object) -> bool:
        return id(t) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, t: Tensor) -> Any:
        return self._entries[id(t)][1]

    def __setitem__(self, t: Tensor, value: Any) -> None:
        self._entries[id(t)] = (t, value)

    def __delitem__(self, t: Tensor) -> None:
        del self._entries[id(t)]

    def get(self, t: Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(t))
        return default if entry is None else entry[1]

    def pop(self, t: Tensor, default: Any = None) -> Any:
        entry = self._entries.pop(id(t), None)
        return default if entry is None else entry[1]


# The grad hooks each param carries (at most one ZeroAdamW drives a param: the newest one built over it). An entry is
# dropped when its ZeroAdamW is freed (``_release_params``) or a newer one hooks the param.
_HOOKS = _ById()
# Every sentinel grad made (see ``_ReduceMixin._make_sentinels``) by a ZeroAdamW not freed yet (``_release_params``
# drops them): a ZeroAdamW built over a param whose p.grad is an older one's sentinel clears it (backward cannot
# accumulate into it). Not weak either: ``model.float()`` under the swap flag swaps p.grad too.
_SENTINELS = _ById()


# ``_seen`` of a param whose grad a reduction refused (not one set by hand over held grads): the next grad found there
# stands for it (the fix the error asks for: a tensor with memory), as the refused grad would have been reduced.
_REFUSED = object()


class _Seen:
    """``_seen`` of a param: the p.grad tensor the grad hooks saw come out of backward (or one standing for it), to
    tell a grad set by hand since from it. Not a weak reference to the grad (``swap_tensors`` refuses a tensor that
    has one, see ``_ById``: ``model.float()`` under the swap flag swaps p.grad too): its id and a weak reference to
    its storage (torch's ``StorageWeakRef``, held by the storage's C++ object), so that once the grad is freed (its
    storage with it) a new tensor given its id is not taken for it. A grad without such a storage (a sparse or
    subclass grad, refused by the step anyway) is held by a weak reference, as before."""

    __slots__ = ("ident", "storage", "ref")

    def __init__(self, g: Tensor) -> None:
        self.ident = id(g)
        plain = has_memory(type(g)) and g.layout == torch.strided
        self.storage = StorageWeakRef(g.untyped_storage()) if plain else None
        self.ref = None if plain else weakref.ref(g)

    def is_(self, g: Tensor) -> bool:
        """Whether ``g`` is the grad seen (attribute reads only)."""
        if self.ref is not None:
            return self.ref() is g
        storage = self.storage
        return (
            id(g) == self.ident and not storage.expired() and has_memory(type(g)) and g.layout == torch.strided
            and g.untyped_storage()._cdata == storage.cdata
        )  # fmt: skip


class _Handles:
    """A param's two grad hooks (before and after its grad is accumulated), removed together; and its grad
    accumulator (the AccumulateGrad node the first hook is on), kept alive with them: autograd holds it weakly, and a
    new one would have no hook."""

    def __init__(self, *handles: Any, accumulator: Any = None, index: int = -1, impl: int = 0) -> None:
        self.handles = handles
        self.accumulator = accumulator
        self.index = index  # the param's index in its ZeroAdamW
        self.impl = impl  # the param's TensorImpl (``_cdata``) when hooked: see _unhook_swapped

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _release_params(params: list[Tensor], sentinels: list[Tensor], handles: list[_Handles]) -> None:
    """Stage 2, once its ZeroAdamW is freed (``weakref.finalize``: called with these three lists of the optimizer's,
    never the optimizer). Its grad hooks are removed and its ``_HOOKS`` entries dropped: each entry keeps its param's
    AccumulateGrad node alive, and that node holds the param, so an entry would keep its own weak key alive, and with
    it the param and the flat buffer the param is a view of, for good. A sentinel of its still in p.grad is taken out
    (None): the grads it stood for were this rank's reduced shards, freed with the optimizer, and backward cannot
    accumulate into it (torch's "more than one element of the written-to tensor refers to a single memory location").
    A p.grad that is not its sentinel (a grad set by hand, a ``no_sync`` pass's grads, a newer ZeroAdamW's sentinel)
    stays, and so do the hooks and the ``_HOOKS`` entry of a newer ZeroAdamW over the param."""
    mine = {id(h) for h in handles}  # (alive: the list holds them)
    for h in handles:
        h.remove()  # (again for the hooks a newer ZeroAdamW removed already: a no-op)
    for i, p in enumerate(params):
        h = _HOOKS.get(p)
        if h is not None and id(h) in mine:
            del _HOOKS[p]
        if sentinels and p.grad is sentinels[i]:
            p.grad = None
    for s in sentinels:
        _SENTINELS.pop(s)
    handles.clear()


def _moved_message(where: str, why: str) -> str:
    return (
        f"{where} is no longer a view of ZeroAdamW's flat buffer ({why}: its .data was replaced or re-pointed, "
        "its storage resized, or the model was moved or cast after the optimizer was built), so its updates would "
        "not reach it: build ZeroAdamW after the model has its final device and dtype, and leave the params' "
        "storage to it"
    )


class _ReduceMixin:
    """Reduce-scatters the grads into this rank's grad shards (see the module docstring)."""

    def _register_hooks(self) -> None:
        """Grad hooks on each param that requires grad and has none yet (run at construction and after each step:
        a param frozen at construction and unfrozen later gets its hooks then; a grad that arrives after its bucket
        was reduced is reduced by step(), see ``_layout_problem``): one after its grad is accumulated (reduces its
        bucket once complete), one before (a grad set by hand that backward accumulates into, see
        ``_note_hand_set``)."""
        self._unhook_swapped()
        if not self._unhooked:
            return
        ref = weakref.ref(self)
        waiting = []
        for s in self._unhooked:
            b = self._buckets[self._bucket_of[s.index]]
            if not s.param.requires_grad:
                waiting.append(s)
                continue

            def hook(_p: Tensor, index: int = s.index) -> None:
                opt = ref()
                if opt is not None:
                    opt._on_grad_ready(index)

            def pre_hook(_grads: tuple, index: int = s.index) -> None:
                opt = ref()
                if opt is None:
                    return
                if opt._outstanding:
                    opt._clear_if_all_zeroed()
                if opt._held[index]:
                    opt._take_sentinel(index)  # (before backward accumulates into p.grad)
                    opt._note_hand_set(index)
                elif opt._params[index].grad is opt._sentinels[index]:
                    opt._params[index].grad = None  # (backward cannot accumulate into a sentinel)

            old = _HOOKS.pop(s.param, None)
            if old is not None:  # an earlier ZeroAdamW over this param must not launch collectives any more
                old.remove()
            # (the first hook is on the param's AccumulateGrad node, not on the param: it runs when backward
            # accumulates into p.grad, not for torch.autograd.grad over the param, which must leave p.grad alone)
            with torch.enable_grad():
                accumulator = s.param.view_as(s.param).grad_fn.next_functions[0][0]
            handle = _Handles(accumulator.register_prehook(pre_hook), s.param.register_post_accumulate_grad_hook(hook),
                              accumulator=accumulator, index=s.index, impl=s.param._cdata)  # fmt: skip
            _HOOKS[s.param] = handle
            self._hook_handles.append(handle)
            b.n_hooked += 1
        self._unhooked = waiting

    def _unhook_swapped(self) -> None:
        """Stage 2, with the grad hooks (from ``_register_hooks``): a param whose tensor was swapped since it was
        hooked (``torch.utils.swap_tensors``, which module conversions call under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``: ``model.float()`` of an fp32 model or
        ``model.share_memory()`` swaps each param with a new tensor over the same memory) lost its hooks, which are on
        its old tensor's AccumulateGrad node. Its grads came out of backward into p.grad since, unreduced, and
        ``step()`` reduced them (as grads set by hand, or those of a rank without a backward). Its old hooks go, and it
        is hooked again, unless a newer ZeroAdamW over it owns its hooks. A param swapped to another dtype, device or
        memory is refused by ``step()`` (``_check_layout``) before this runs. Attribute reads only."""
        params = self._params
        stale = [h for h in self._hook_handles if params[h.index]._cdata != h.impl]
        if not stale:
            return
        gone = {id(h) for h in stale}
        self._hook_handles[:] = [h for h in self._hook_handles if id(h) not in gone]  # (the finalizer's list)
        for h in stale:
            h.remove()
            p = params[h.index]
            if _HOOKS.get(p) is h:  # (else a newer ZeroAdamW removed these hooks: it hooks the param itself)
                del _HOOKS[p]
                # The param kept its dict of post-accumulate-grad hooks, but the new tensor has none registered (torch
                # registers the dict when it is set): set it again, so that it fires for the new tensor, ours as
                # it fired before the swap.
                p._post_accumulate_grad_hooks = p._post_accumulate_grad_hooks
                b = self._buckets[self._bucket_of[h.index]]
                b.n_hooked -= 1
                self._unhooked.append(next(s for s in b.slots if s.index == h.index))

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

    def _make_sentinels(self) -> list[Tensor]:
        """Stage 2: one sentinel grad per param, made once: zeros of the param's shape, dtype and device with zero
        strides, each over an element of its own of one storage per dtype and device (one element a param: what
        ``fill_``, ``masked_fill_`` or, for a one-element param, any in-place op writes into one sentinel never shows
        in another). Each is a tensor of its own (``set_``, not a view), so each has its own version counter:
        zeroing one in place (``model.zero_grad(set_to_none=False)``) changes that one's ``_version`` only. Also
        clears a p.grad that is an older ZeroAdamW's sentinel."""
        counts: dict[tuple, int] = {}
        for p in self._params:
            counts[(p.dtype, p.device)] = counts.get((p.dtype, p.device), 0) + 1
        storages = {k: torch.zeros(n, dtype=k[0], device=k[1]).untyped_storage() for k, n in counts.items()}
        taken: dict[tuple, int] = {}
        sentinels = []
        for p in self._params:
            if p.grad is not None and p.grad in _SENTINELS:
                p.grad = None
            k = (p.dtype, p.device)
            offset = taken[k] = taken.get(k, -1) + 1
            t = torch.empty(0, dtype=p.dtype, device=p.device).set_(storages[k], offset, p.shape, (0,) * p.dim())
            _SENTINELS[t] = None
            sentinels.append(t)
        return sentinels

    def _give_sentinels(self) -> None:
        """Stage 2, after a step: each param whose grads stay held in the shards (for the next step, as torch keeps
        p.grad until it is zeroed) gets its sentinel as p.grad, its ``_version`` noted, so that what the user does to
        p.grad before the next backward or step can be told apart (``_check_cleared``): nothing (the sentinel, same
        version), zeroed (None: ``model.zero_grad()``, ``p.grad = None``; or the sentinel written:
        ``model.zero_grad(set_to_none=False)``) or set by hand (another tensor). A sentinel is never a grad: it is
        read as None by the reductions and the checks, and taken out of p.grad before backward accumulates into it
        (``_take_sentinel``). The others get None. Once the optimizer is freed, a sentinel still in p.grad is taken out
        (None: the held grads were its shards, gone with it; see ``_release_params``)."""
        for i, (p, held, s) in enumerate(zip(self._params, self._held, self._sentinels, strict=True)):
            if held:
                p.grad = s
                self._given[i] = s._version
            else:
                p.grad = None
                self._given[i] = None
        # (also where this rank holds no grads of its own but its shards hold others' kept ones: _note_others_kept)
        self._outstanding = any(self._held) or any(self._held_any)

    def _note_others_kept(self) -> None:
        """Stage 2, the first pass (or step) after a step: this rank held none of a param's grads that another rank
        kept (it had no batch, say), yet its shards hold their sum. Whether those ranks keep or clear them it cannot
        see, and it cannot drop its part of the sum alone: it counts as keeping them, so that ranks that cleared
        everything make the step raise on every rank (``_CLEARED_ON_SOME``), nothing changed, instead of adding
        this pass to the old sums on this rank's shards only (a silent wrong step). ``opt.zero_grad()`` clears them
        on every rank."""
        if not any(self._held) and any(self._held_any):
            self._kept_old = True

    def _clear_if_all_zeroed(self, in_step: bool = False) -> None:
        """Stage 2, the first backward after a step that gave sentinels (from its first grad hook, or its first
        reduction), or ``step()`` on a rank that ran none since (``in_step``: see ``_note_hand_set_grads``): if the
        user replaced every held grad since (zeroed them: ``model.zero_grad()`` in the usual loop
        ``backward; step; model.zero_grad()``; or set some by hand), this rank's grad shards are dropped as
        ``zero_grad()`` drops them, locally, before the pass (or the step) reduces into them: no per-param work after
        this, no extra collective, the pass as after ``zero_grad()`` (a grad set by hand is then this rank's grad,
        reduced by the pass as backward's; before, on one rank of two that set the same grads by hand, the other having
        zeroed every held grad, the ranks took different paths, and the step refused what every rank did alike).
        Otherwise (some kept) each param is handled on its own (``_check_cleared``: zeroed ones dropped at the step,
        agreed). The step's agreement compares the ranks: one rank that cleared everything while another kept some
        raises on every rank (``_CLEARED_ON_SOME``). ``in_step`` leaves p.grad alone (a failed step leaves p.grad as
        it was): a sentinel zeroed in place stays there, read as None as every sentinel is, until the step's commit
        gives p.grad anew (``_give_sentinels``) or a backward takes it out (the pre-hook)."""
        self._outstanding = False
        replaced, written = 0, []
        for i, (p, held, version) in enumerate(zip(self._params, self._held, self._given, strict=True)):
            if version is None:
                if held:
                    return  # (held grads without a sentinel: handled per param)
                continue
            g, s = p.grad, self._sentinels[i]
            if g is s and s._version == version:
                return  # (kept)
            replaced += 1
            if g is s:
                written.append(p)
        if not replaced:
            self._note_others_kept()
            return
        for p in () if in_step else written:
            p.grad = None  # (a sentinel zeroed in place)
        for b in self._buckets:
            b.grad_valid = False
        n = len(self._params)
        self._held, self._given, self._seen = [False] * n, [None] * n, [None] * n
        # (nothing of this pass is kept out for grads other ranks kept, see _fill_staging: in the usual loop every
        # rank clears all of them, and a rank that kept some makes the step raise on every rank, _CLEARED_ON_SOME)
        self._held_any = [False] * n
        self._cleared_all = True

    def _check_cleared(self, index: int) -> None:
        """Stage 2, param ``index`` with held grads: whether the user zeroed its grad since the last step. With the
        sentinel given after that step outstanding: still there, same version, nothing was done; otherwise it is no
        longer outstanding, and p.grad None or the sentinel written in place (``model.zero_grad()``, with or
        without ``set_to_none``; ``p.grad = None``) is zeroed. Without it: p.grad None where the grad hooks saw a
        grad come out of backward and left it there (a no_sync pass since) is zeroed (``p.grad = None``). A zeroed
        grad's held grads are replaced by nothing, as a grad set by hand replaces them (``_replaced``: dropped on
        every rank at the step, see ``_agree_on_drops``); another tensor is a grad set by hand (``_note_hand_set``).
        Never changes p.grad (a failed step leaves it as it was)."""
        g = self._params[index].grad
        version = self._given[index]
        if version is not None:
            s = self._sentinels[index]
            if g is s and s._version == version:
                self._kept_old = True  # (see _clear_if_all_zeroed)
                return
            self._given[index] = None
            if g is None or g is s:
                self._replaced.add(index)
        elif g is None and isinstance(self._seen[index], _Seen):
            self._seen[index] = None
            self._replaced.add(index)

    def _take_sentinel(self, index: int) -> None:
        """Stage 2, before backward accumulates into param ``index``'s p.grad, or a synced pass reduces its bucket:
        ``_check_cleared``, then a sentinel still in p.grad is taken out (None), its grads still held."""
        self._check_cleared(index)
        p = self._params[index]
        if p.grad is self._sentinels[index]:
            p.grad = None
            self._given[index] = None

    def _note_hand_set(self, index: int) -> None:
        """Stage 2: param ``index`` has grads in this rank's shards that p.grad no longer shows (``_held``): a p.grad
        the grad hooks did not see come out of backward was set by hand, and replaces them, as ``p.grad = g``
        replaces torch's grad (called before backward accumulates into p.grad, when a bucket is reduced and by
        ``step()``). Such a grad is kept out of synced passes (in p.grad, where backward accumulates into it) and
        reduced by the step, which drops the param's reduced grads on every rank first (see ``_agree_on_drops``)."""
        g = self._params[index].grad
        if g is not None and g is not self._sentinels[index]:
            seen = self._seen[index]
            if seen is _REFUSED:
                self._seen[index] = _Seen(g)
            elif seen is None or not seen.is_(g):
                self._replaced.add(index)

    def _note_hand_set_grads(self) -> None:
        """Stage 2, before a step: ``_note_hand_set`` for every param with grads held in the shards."""
        if self.stage == 2:  # (only a held param with a grad can have one set by hand: one pass of attribute reads)
            if self._outstanding and self._held_alike:
                # No pass since the step gave the sentinels (a pass's first hook or reduction would have looked): this
                # rank takes the same path as a rank whose backward began, so that in the usual loop (backward; step;
                # model.zero_grad()) followed by a step in which this rank has no batch, its reduction here pairs with
                # the others' pass into shards dropped as theirs were (before, it kept its shards and asked to drop
                # each param at the step, while the others held this pass's grads of it: refused on every rank). A
                # rank that kept some held grads still handles each param on its own, and the agreement refuses a
                # rank that cleared everything while another kept some (_CLEARED_ON_SOME), as after a backward.
                # Only where every rank holds grads of the same params (agreed at the last step): a rank that held
                # some params only (others' grads of the rest lie in its shards too) may have replaced all of its own
                # while another keeps the rest, which the per-param drops (agreed, on every rank) handle, not this.
                self._clear_if_all_zeroed(in_step=True)
            elif self._outstanding:
                self._note_others_kept()
            self._outstanding = False  # (otherwise each param on its own, as before)
            given, seen = self._given, self._seen
            for i, (held, g) in enumerate(zip(self._held, [p.grad for p in self._params], strict=True)):
                if held and (g is not None or given[i] is not None or seen[i] is not None):
                    self._check_cleared(i)  # (zeroed by the user: its held grads are replaced by nothing)
                    if g is not None:
                        self._note_hand_set(i)

    def _on_grad_ready(self, index: int) -> None:
        if self._held[index]:  # (the grad backward accumulated: not one set by hand, see _note_hand_set)
            g = self._params[index].grad
            self._seen[index] = None if g is None else _Seen(g)
        if not self._sync_grads:
            self._unsynced_grads = True
            return
        if not self._round_open:
            if self._rounds_since_step > 0 and not self._open_another_round():
                self._unsynced_grads = True  # ranks out of step: no collective until step() raises on every rank
                return
            self._round_open = True
            self._unsynced_grads = False
            self._zeroed = False  # the shards start again from this pass's grads (zero_grad left them invalid)
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

    def _open_another_round(self) -> bool:
        """A synced backward pass after another one since the last step: the ranks must all be beginning one (a rank
        that steps instead would pair its step's all-reduce with this pass's reduce-scatters). Its first collective
        is an all-reduce of the size of step()'s agreement, marked as a pass: a rank in step() pairs with it, sees
        the mark and raises (after matching this pass's reduce-scatters); this rank reads the outcome when the next
        pass begins or in step(), and raises there. It also says whether this rank called zero_grad() after its last
        pass, where step() sends ``zeroed``: when every rank did, the stepping ranks stand in for this pass instead
        (see ``_read_agreement``). Returns False when the ranks are known to be out of step."""
        if self._round_mismatch or not self._round_header_ok():
            return False
        vec = torch.zeros(self._agreement_size(), dtype=torch.float64, device=self._device)
        vec[2] = 1.0  # the number of ranks beginning a pass (step() sends 0 here)
        vec[3] = float(self._zeroed)  # (read before this pass resets it)
        work = dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        self._round_header = (vec, work)
        return True

    def _round_header_ok(self) -> bool:
        """Whether every rank began the last pass this rank announced, or the others stood in for it (waits for that
        all-reduce: a host read). Otherwise ``_round_mismatch`` holds the counts of ranks that began it and that had
        called zero_grad() after their last pass, for the message (the ranks that stepped read the same sums)."""
        if self._round_header is not None:
            vec, work = self._round_header
            self._round_header = None
            if work is not None:  # (None: waited for at the end of the pass, see _finish_round)
                work.wait()
            n_passes, n_zeroed = (int(v) for v in vec[2:4].tolist())
            # (every rank zeroed after its last pass: the ranks that stepped stand in for this one, see _read_agreement)
            if n_passes != self.world_size and n_zeroed != self.world_size:
                self._round_mismatch = (n_passes, n_zeroed)
        return not self._round_mismatch

    def _match_other_ranks_round(self) -> None:
        """Another rank began a synced pass while this one stepped: run that pass's reduce-scatters (zeros, thrown
        away) so that both ranks leave the same collectives behind, before every rank raises."""
        for b in self._buckets:  # (in a staging buffer, in place: no allocation after the ranks agreed)
            pool = self._pools[(self._reduce_dtype(b), self._device)]
            flat = pool.flat[0].narrow(0, 0, b.numel)
            flat.zero_()
            _reduce_scatter(flat.narrow(0, self.rank * b.shard_numel, b.shard_numel), flat, self.process_group, False)

    def _end_round(self) -> None:
        """End of a backward pass: reduce every bucket not reduced yet (zeros for params without grads), then wait
        for the pass's collectives (``_finish_round``)."""
        with torch.no_grad():
            while self._next_bucket < len(self._buckets):
                self._launch(self._buckets[self._next_bucket])
                self._next_bucket += 1
        self._round_open = False
        self._next_bucket = 0
        self._rounds_since_step += 1
        self._finish_round()

    def _finish_round(self) -> None:
        """Wait for the pass's collectives (its header all-reduce, read later by ``_round_header_ok``, and its
        reduce-scatters, added to the shards), as DDP waits for its all-reduces at the end of backward: no work is
        left pending after backward() returns. A work still pending when the process group is destroyed, or when
        the process exits, aborts the process with gloo ('terminate called without an active exception'). On CUDA
        ``wait()`` makes the current stream wait, without a host sync. The ranks' collectives are unchanged: every
        rank issued these already (a rank stepping instead pairs with them in its step)."""
        if self._round_header is not None and self._round_header[1] is not None:
            vec, work = self._round_header
            self._round_header = None
            work.wait()
            self._round_header = (vec, None)
        with torch.no_grad():
            while self._inflight:
                self._finish_oldest()

    def _grad_error(self, s: _Slot, view: Tensor) -> tuple[str, str]:
        g = s.param.grad
        where = f"param {s.index} (shape {tuple(view.shape)})"
        b = self._buckets[self._bucket_of[s.index]]
        what = _bucket_moved(b)
        moved = f"the storage of its bucket {what}" if what is not None else _slot_moved(s, b)
        if moved is not None:
            return "RuntimeError", _moved_message(where, moved)
        if not has_memory(type(g)):
            return "TypeError", (
                f"the grad of {where} is a {type(g).__name__}, not a tensor with memory of its own (the param is a "
                "plain tensor): give it a plain tensor grad"
            )
        if g.is_sparse:
            return "RuntimeError", f"ZeroAdamW does not support sparse gradients; the grad of {where} is sparse"
        if not g.is_floating_point():
            return "RuntimeError", f"the grad of {where} is {g.dtype}"
        if g.dtype != b.dtype:
            return "TypeError", f"the grad of {where} is {g.dtype} but the param is {b.dtype}"
        if g.device != b.param_flat.device:
            return "ValueError", f"the grad of {where} is on {g.device} but the param is on {b.param_flat.device}"
        if g.shape == view.shape and outside_storage(g):
            return "RuntimeError", (
                f"the grad of {where} lies outside its storage ({g.untyped_storage().nbytes()} bytes): its storage "
                "was freed or shrunk in place (e.g. by p.grad.untyped_storage().resize_()); set p.grad = None "
                "instead, or give it a tensor with memory"
            )
        return "RuntimeError", f"the grad of {where} has shape {tuple(g.shape)}"

    def _refused(self, s: _Slot, b: _Bucket) -> bool:
        """Whether a reduction sends zeros for this slot instead of its grad (step() raises ``_grad_error``)."""
        g = s.param.grad
        return _slot_moved(s, b) is not None or (
            g is not None
            and not (self._sentinels and g is self._sentinels[s.index])  # (no grad: see _give_sentinels)
            and (
                g.shape != s.shape or g.dtype != b.dtype or g.device != b.param_flat.device or not has_memory(type(g))
                or g.is_sparse or outside_storage(g)
            )
        )  # fmt: skip

    def _forget_fixed_grads(self) -> None:
        """Stage 2, before a step: a grad refused by a reduction whose shards were kept (a synced pass, or a failed
        step's stand-in reduction) is no longer refused once p.grad is valid again or None. That reduction sent zeros
        for it (its values reached no rank's shards): a valid grad it holds now is reduced by the step's late
        reduction (p.grad is set: every rank agrees to it) and checked there again; None adds nothing, as p.grad =
        None would have. The grad given in its place replaces no held grads (``_note_hand_set``) unless the refused
        one did. Local: whether the step fails is still agreed by every rank."""
        for b in self._buckets:
            for s in b.slots:
                if s.index in self._grad_errors and not self._refused(s, b):
                    del self._grad_errors[s.index]
                    g = s.param.grad  # (it stands for the refused grad: set by hand over held grads only if that was)
                    self._seen[s.index] = None if g is None or g is self._sentinels[s.index] else _Seen(g)

    def _launch(
        self, b: _Bucket, free_grads: bool = True, zeros: bool = False, drop: frozenset = frozenset(),
        discard: bool = False,
    ) -> None:  # fmt: skip
        """Copy the bucket's grads into a staging buffer and start its reduce-scatter (stage 2 frees the grads
        unless ``free_grads`` is False: step() frees them once it has succeeded; ``zeros``: send zeros, for a rank
        whose grads were reduced already, but the grads of the params in ``drop``, whose reduced grads step() has
        dropped). In a synced pass (``free_grads``) a grad set by hand over held grads stays in p.grad, and zeros
        go in its place (see ``_note_hand_set``)."""
        b.ready.clear()
        key = (self._reduce_dtype(b), self._device)
        pool = self._pools[key]
        while not pool.free:
            self._finish_oldest()
        si = pool.free.pop()
        flat = pool.flat[si].narrow(0, 0, b.numel)
        # (step(): once this rank met a problem in the step's reductions, the rest only run their collectives)
        discard = discard or (not free_grads and bool(self._reduce_faults))
        if not discard:
            try:
                self._fill_staging(b, si, flat, free_grads, zeros, drop)
            except Exception as e:  # noqa: BLE001 - step(): agreed on (the collective still runs, with zeros)
                if free_grads or self._reduce_faults is None:  # (a synced pass, outside step(): as before)
                    pool.free.append(si)
                    raise
                self._reduce_faults.append(e)
                discard = True
        if discard:
            flat.zero_()
        # Straight into the grad shard when nothing is there yet (and the dtypes agree); otherwise in place (into
        # this rank's slice of the staging buffer: NCCL and gloo support it), added to the shard when it lands.
        # (``discard``: a reduction of a step that has failed on this rank, run so that every rank runs the same
        # collectives: its zeros land in the staging buffer, and the shard is left alone)
        direct: bool | None = None if discard else key[0] == b.grad.dtype and not b.grad_valid and b.inflight == 0
        out = b.grad if direct else flat.narrow(0, self.rank * b.shard_numel, b.shard_numel)
        work = _reduce_scatter(out, flat, self.process_group, async_op=True)
        b.inflight += 1
        self._inflight.append((b, pool, si, out, direct, work))
        if not self.overlap_comm:
            self._finish_oldest()

    def _fill_staging(self, b: _Bucket, si: int, flat: Tensor, free_grads: bool, zeros: bool, drop: frozenset) -> None:
        """``_launch``'s local part: the bucket's grads (zeros where there are none) into staging buffer ``si``."""
        _bucket_moved(b)  # (a buffer moved into shared memory: its params' addresses re-read before they are checked)
        views = b.staging_views.get(si)
        if views is None:  # built once per (bucket, staging buffer): the launch path stays cheap on the host
            # (in each param's shape as laid out, not its shape now: a param given another .data of another size
            # is refused by step() on every rank, not by a view that fails on this rank only)
            views = b.staging_views[si] = (
                [flat.narrow(0, lo, hi - lo) for lo, hi in b.gaps],
                [flat.narrow(0, s.offset, s.numel).view(s.shape) for s in b.slots],
            )
        dst, src, zero, bad = [], [], list(views[0]), False
        keep = free_grads and self.stage == 2 and not zeros
        if keep and self._outstanding:
            self._clear_if_all_zeroed()
        sentinels = self._sentinels
        sent, kept_out = [], []
        for s, view in zip(b.slots, views[1], strict=True):
            if zeros and s.index not in drop:
                zero.append(view)
                continue
            g = s.param.grad
            if keep and self._held[s.index]:
                self._take_sentinel(s.index)  # (a param without a grad in this pass: no hook saw it)
                g = s.param.grad
                if g is not None:
                    self._note_hand_set(s.index)  # (set by hand: as above)
            elif g is not None and sentinels and g is sentinels[s.index]:
                g = None  # (a sentinel is no grad: see _give_sentinels)
            if keep and s.index in self._replaced:
                zero.append(view)  # reduced by step(), after every rank dropped the grads it replaces
            elif self._refused(s, b):
                # Never raised here (only this rank would, mid-sequence of collectives): reduced as zeros, and
                # step() raises the error on every rank.
                self._grad_errors.setdefault(s.index, self._grad_error(s, view))
                if s.index not in self._replaced:
                    self._seen[s.index] = _REFUSED
                zero.append(view)
                bad = True
            elif g is None:
                zero.append(view)
            elif keep and self._held_any[s.index] and not self._held[s.index]:
                # Other ranks hold grads of it kept from before the last step, this rank none: should they replace
                # theirs (p.grad = None or set by hand, on every rank that holds them) the step drops them from the
                # shards, which hold only the sum, and this grad would go with them. Reduced by the step instead (it
                # stays in p.grad: a late reduction, after the drops are agreed), as each rank's p.grad is its own.
                zero.append(view)
                kept_out.append(s.index)
            else:
                dst.append(view)
                src.append(g)
                sent.append(s.index)
        if dst:
            torch._foreach_copy_(dst, src)
        if zero:
            torch._foreach_zero_(zero)
        if keep:
            for s in b.slots:
                if (
                    (not bad or s.index not in self._grad_errors)
                    and s.index not in self._replaced
                    and s.index not in kept_out
                ):
                    s.param.grad = None
                    self._seen[s.index] = None
            for i in sent:
                self._held[i] = True

    def _finish_oldest(self) -> None:
        b, pool, si, out, direct, work = self._inflight.popleft()
        try:
            work.wait()
        except BaseException:
            # (a failed collective: the peer is gone or timed out. Its staging slot is free again and the bucket's
            # shard is no longer valid, so that the next call raises the collective's own error, not an IndexError
            # from an empty pool)
            b.inflight -= 1
            b.grad_valid = False
            pool.free.append(si)
            raise
        if direct is None:  # (discarded: see _launch)
            pass
        elif not direct:
            if b.grad_valid:
                b.grad.add_(out)
            else:
                b.grad.copy_(out)
        if direct is not None:
            b.grad_valid = True
        b.inflight -= 1
        pool.free.append(si)

    def _drain(self) -> None:
        if self._round_open:  # a backward pass that failed half-way: finish its round so ranks stay in step
            self._end_round()
        while self._inflight:
            self._finish_oldest()

    def _reduce_all(
        self, late: bool = False, undo: tuple | None = None, drop: frozenset = frozenset(), only_drop: bool = False
    ) -> tuple | None:
        """Make every bucket's grad shard final for this step.

        Before the step's agreement (``late`` False): stage 1, and stage 2 without a synced backward since the
        last step, reduce what ``p.grad`` holds now (the same collectives, in number and size, as the synced pass
        another rank may have run instead). After it (``late``, agreed by every rank): stage 2 reduces the grads
        that came after their bucket's reduce-scatter (set by hand, accumulated under no_sync after the last
        synced pass, or of a param unfrozen after construction), or all of p.grad after zero_grad(); a rank that
        reduced before the agreement sends zeros. ``drop``: the params whose reduced grads a grad set by hand
        replaces (agreed, see ``_agree_on_drops``): their part of the shards is zeroed first, and every rank sends
        their p.grad (``only_drop``: only the buckets holding them are reduced again, the rest being final).

        Returns what a failed step puts back (see ``_undo_reduce``), None when there is nothing to put back: stage
        1 recomputes its shards from ``p.grad`` at every step, and in stage 2 after a synced backward they are
        final already.
        """
        self._drain()
        reduce = late or self.stage == 1 or self._rounds_since_step == 0
        if self.stage == 2 and undo is None and (reduce or not all(b.grad_valid for b in self._buckets)):
            # Into new shards, and p.grad is kept until the step succeeds: a failed step puts the old shards back
            # and leaves p.grad as it was, so that nothing is reduced twice.
            undo = ([(b, b.grad, b.grad_valid) for b in self._buckets], dict(self._grad_errors))
            try:
                new = [b.grad.clone() if b.grad_valid else torch.empty_like(b.grad) for b in self._buckets]
            except Exception as e:  # noqa: BLE001 - step(): agreed on; the reductions below only run their collectives
                if self._reduce_faults is None:
                    raise
                self._reduce_faults.append(e)
            else:
                for b, g in zip(self._buckets, new, strict=True):
                    b.grad = g
                self._adam_view_cache.clear()
        if reduce:
            if self.stage == 1:  # p.grad holds the whole accumulation: the shards are replaced, not added to
                self._grad_errors.clear()
                for b in self._buckets:
                    b.grad_valid = False
            zeros = late and self._rounds_since_step == 0
            buckets = self._buckets
            with torch.no_grad():
                if drop:
                    try:
                        for i in drop:
                            seg = self._segment_of.get(i)
                            if seg is not None and seg.bucket.grad_valid and not self._reduce_faults:
                                seg.bucket.grad.narrow(0, seg.start, seg.hi - seg.lo).zero_()
                    except Exception as e:  # noqa: BLE001 - as above
                        if self._reduce_faults is None:
                            raise
                        self._reduce_faults.append(e)
                    if only_drop:
                        ids = {self._bucket_of[i] for i in drop}
                        buckets = [b for b in self._buckets if b.index in ids]
                for b in buckets:
                    self._launch(b, free_grads=False, zeros=zeros, drop=drop)
            self._drain()
        if self._reduce_faults:  # (the step fails on every rank: the shards are left alone, see _launch)
            return undo
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

    def _keep_stand_in_pass(self) -> None:
        """A failed step in which this rank reduced ``p.grad`` while other ranks had run a synced backward pass (their
        reduce-scatters paired with this rank's): the reduced shards stay, counted as this rank's synced pass (and its
        grads freed, as that pass would have), so that every rank has one pass since the last step. Putting the
        shards back would leave the ranks counting different passes: a retried step or the next backward would run
        other collectives on each (a gloo size mismatch and SIGABRT, before)."""
        self._stood_in = False
        self._rounds_since_step = max(self._rounds_since_step, 1)
        self._unsynced_grads = False
        self._zeroed = False
        for b in self._buckets:
            for s in b.slots:
                # (a refused grad stays: the retried step refuses it again; so does a grad set by hand over held
                # grads: the retried step drops them, this reduction's share of it too, and reduces it again)
                if s.index not in self._grad_errors and s.index not in self._replaced:
                    if s.param.grad is not None and s.param.grad is not self._sentinels[s.index]:
                        self._held[s.index] = True
                    s.param.grad = None  # (a sentinel still there too: taken out, as a synced pass takes it out)
                    self._given[s.index] = None
                    self._seen[s.index] = None

    def _held_after_step(self) -> list[float]:
        """Stage 2, sent in the step's agreement: per param, 1.0 where this rank will hold grads of it once the step
        commits (as ``_commit_reduce`` sets ``_held``): held grads not replaced (a replaced param is dropped on every
        rank, or the step fails), or a p.grad the step reduces. Summed over the ranks: the params whose kept grads
        some rank holds (``_held_any``, the same on every rank)."""
        if self.stage != 2:
            return []
        replaced, held = self._replaced, self._held
        return [float((held[i] and i not in replaced) or (p.grad is not None and p.grad is not s))
                for i, (p, s) in enumerate(zip(self._params, self._sentinels, strict=True))]  # fmt: skip

    def _commit_reduce(self, undo: tuple | None, drop: frozenset = frozenset()) -> None:
        self._rounds_since_step = 0
        self._unsynced_grads = False
        self._zeroed = False
        if self.stage == 2:
            # The shards are kept for the next step (p.grad, which torch keeps until zero_grad): they hold this
            # rank's grads of every param it reduced a grad of, and of no dropped one it did not.
            for i in drop:
                self._held[i] = False
            if undo is not None:
                for i, (p, s) in enumerate(zip(self._params, self._sentinels, strict=True)):
                    if p.grad is not None and p.grad is not s:
                        self._held[i] = True
            self._held_any = self._held_agreed  # (agreed by the step: see _held_after_step and _fill_staging)
            self._held_alike = self._held_alike_agreed
            self._seen = [None] * len(self._params)
            self._replaced.clear()
            self._cleared_all = self._kept_old = False
            # p.grad (reduced in step(), free it now, as backward would have; or None since a synced pass): a
            # sentinel where grads stay held, None elsewhere
            self._give_sentinels()
        self._mark_grads()

    def _mark_grads(self) -> None:
        """Stage 1 has no grad hooks: it tells a backward since the last step or zero_grad by the grads' identities
        and version counters, recorded here (attribute reads only)."""
        if self.stage == 1:
            self._grad_marks = [_grad_mark(p.grad) for p in self._params]

    def _grads_changed(self) -> bool:
        """Stage 1: whether some p.grad was created, replaced or written since ``_mark_grads``."""
        marks = self._grad_marks
        for p, m in zip(self._params, marks, strict=True):
            g = p.grad
            if _grad_mark(g) != m:
                return True
        return False

    def _zeroed_before_step(self) -> bool:
        """zero_grad() was called between the last backward and this step (compared between ranks by step())."""
        if self.stage == 2:
            return self._rounds_since_step > 0 and self._zeroed
        return self._zeroed and not self._grads_changed()  # stage 1: no backward since that zero_grad

    def _zeroed_since_step(self) -> bool:
        """Stage 1: zero_grad() was called after a backward since the last step, with or without a backward since (a
        batch discarded): step() refuses ``_zeroed_before_step`` on some ranks only while another rank made no such
        call, whose p.grad spans every backward since the last step. Stage 2: ``_zeroed_before_step`` (a rank that ran
        another synced pass after zero_grad() holds that pass's sums in its shards, one that zeroed after it not)."""
        if self.stage == 2:
            return self._zeroed_before_step()
        # (a rank whose every p.grad is None holds nothing a zeroing rank's step could be mixed with: a rank that had no
        # batch while another discarded its own, probe 76; one that kept its grads, old or new, does not count)
        return self._zeroed or all(p.grad is None for p in self._params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset grads: ``p.grad`` (as torch) and this rank's reduced-grad shards."""
        self._drain()
        if self.stage == 1 and self._grads_changed():  # a backward (or grads set) since the last step / zero_grad
            self._zeroed = True
        # (stage 2: the reduced grads a step kept, dropped here: a clear of everything, as model.zero_grad() before the
        # next pass is, which the step's agreement compares with the other ranks: one rank clearing while another
        # keeps them raises on every rank, instead of a step with kept grads on some ranks' shards only; probe 76)
        dropped_kept = self.stage == 2 and (self._outstanding or any(self._held) or any(self._held_any)
                                            or self._cleared_all)  # fmt: skip
        sentinels = self._sentinels or [None] * len(self._params)
        for p, s in zip(self._params, sentinels, strict=True):
            if p.grad is not None:
                # (a grad without memory has nothing to zero: dropped; a sentinel is no grad)
                if set_to_none or p.grad is s or (p.grad.layout == torch.strided and outside_storage(p.grad)):
                    p.grad = None
                else:
                    p.grad.detach_().zero_()
        for b in self._buckets:
            b.grad_valid = False
        # The count of synced passes is kept (a zero_grad on one rank only must not change how many collectives
        # it runs): step() reduces p.grad after its agreement when every rank called zero_grad after backward.
        if self._rounds_since_step > 0:
            self._zeroed = True
        self._mark_grads()
        self._unsynced_grads = False
        self._grad_errors.clear()
        self._held = [False] * len(self._params)  # (nothing held: a grad set now replaces nothing)
        self._held_any = [False] * len(self._params)
        self._held_alike = True
        self._seen = [None] * len(self._params)
        self._given = [None] * len(self._params)
        self._outstanding = self._cleared_all = self._kept_old = False
        self._cleared_all = dropped_kept
        self._replaced.clear()
        self._out_of_step = False  # (every rank's shards start again from the next pass)


def _grad_mark(g: Tensor | None) -> tuple | None:
    """What stage 1 notes of a grad to tell a later change: its identity and version counter. An inference tensor
    (a grad made under ``torch.inference_mode()``, which the step only reads) has no version counter: its identity
    alone (it can be written only inside inference mode, unseen here)."""
    if g is None:
        return None
    return (id(g), None) if g.is_inference() else (id(g), g._version)
