"""Chunk tables: many tensors -> one launch.

A multi-tensor launch covers ``n_tensors`` tensors, each seen through ``n_roles`` same-sized tensors (for
Adam: param, grad, exp_avg, exp_avg_sq, ...). The launcher packs, into ONE int64 device tensor:

    [ addr[role 0][0..T) | addr[role 1][0..T) | ... | numel[0..T) | chunk_tensor[0..C) | chunk_start[0..C) ]

``addr`` are ``data_ptr()`` values (the kernel casts them to typed pointers), ``numel`` the element counts,
and for each of the ``C`` programs the tensor it works on and the element where its chunk starts. One
program handles at most ``chunk_size`` elements of one tensor, so a 10-element tensor costs one small
program and a 10^9-element tensor ``10^9 / chunk_size`` programs. All entries are int64, so tensors and
offsets past 2^31 elements are addressed correctly.

Building the table is host work proportional to the number of tensors; it is cached by the tuple of
addresses and sizes, so a training loop pays it once. What the cache never saves is the check: the caller's
``check`` runs on every call, hit or miss, because a tensor at a cached address may be another tensor now
(another dtype, fewer elements, other strides) and the table only says where to write, not what is there.

Lifetimes and streams (CUDA):

- a table that a CUDA graph captures is read by every replay, so it must never be freed nor rewritten. A cache
  hit during a capture moves the table into ``_CAPTURED`` (module lifetime, never evicted); a miss during a
  capture raises (building a table pins host memory and copies it to the device: not capturable), so the first
  call on a set of tensors must be eager (the warm-up every capturable optimizer needs). Tables owned by a
  prepared launcher (``AdamStep``) give each capture a table of its own, which nothing rewrites.
- a table carries the stream it was last used on. A launch on another stream first makes the current stream
  wait for that one (the table's upload and earlier launches that use its arrival counters are then ordered
  before it) and records the new stream on the table's memory, so the allocator does not hand the memory out
  while a kernel on that stream may still read it.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import (
    NoUserCode,
    check_no_overrides,
    check_role,
    check_roles_memory,
    check_scalar,
    check_shared_memory,
    inside_storage,
    plain_flag,
    plain_value,
)

_DATA_PTR = torch.Tensor.data_ptr  # (unbound: never a method set on the object)


@dataclass(frozen=True)
class ChunkTable:
    """A packed chunk table on the tensors' device, with the offsets of its sections."""

    table: torch.Tensor  # int64, on the tensors' device
    n_tensors: int
    n_chunks: int
    numel_offset: int  # index of numel[0] in ``table``
    chunk_tensor_offset: int  # index of chunk_tensor[0]
    chunk_start_offset: int  # index of chunk_start[0]
    aligned: bool  # every address is a multiple of 16 bytes (the kernels may then use 128-bit accesses)
    counters: torch.Tensor | None = None  # int32 zeros, one per tensor (``with_counters``): see below
    role_aligned: tuple[bool, ...] = ()  # ``aligned`` per role (``aligned`` is their conjunction)
    # The stream the table was last used on (CUDA), in a 1-element list shared by the table's copies
    # (``dataclasses.replace``), so ``use_on_current_stream`` can order a launch on another stream after it.
    last_stream: list = dataclasses.field(default_factory=lambda: [None], compare=False)
    host: torch.Tensor | None = None  # the table's contents on the host (int64, CPU), for copies of the table


# The table's integer offsets every kernel takes. Triton would specialise an int argument equal to 1 (a constant)
# or divisible by 16 (an alignment hint) and compile a variant per class of values: up to 8 compiles of seconds
# each as the set of tensors changes (frozen layers, a rank owning another number of segments). They only index
# the table, so no access pattern gains from it: every kernel lists them in ``do_not_specialize``. (Float
# arguments are never specialised; launchers pass floats, not ints, for the same reason.)
TABLE_INTS = ["n_tensors", "numel_offset", "chunk_tensor_offset", "chunk_start_offset"]


# Tables read by captured CUDA graphs: kept for the life of the process (graphs replay them; nothing may free
# or rewrite them). Keyed by id of the table tensor, so a table captured twice is kept once.
_CAPTURED: dict[int, ChunkTable] = {}


def is_capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def keep_for_capture(table: ChunkTable) -> ChunkTable:
    """Keep ``table`` alive for the life of the process (a captured graph reads it); return it."""
    _CAPTURED.setdefault(id(table.table), table)
    return table


def aligned_except(table: ChunkTable, skip: tuple[int, ...]) -> bool:
    """Whether every role of ``table`` is 16-byte aligned, leaving out the roles in ``skip`` (negative: from the
    end): those a kernel reads without alignment hints (step counts, int8 block scales). Their offsets must not
    take the vectorised accesses of the others away (a ZeRO shard's scale views start on 4-byte boundaries)."""
    ra = table.role_aligned
    if not ra:
        return table.aligned
    left_out = {r % len(ra) for r in skip}
    return all(a for r, a in enumerate(ra) if r not in left_out)


def use_on_current_stream(table: ChunkTable) -> None:
    """Order a launch on the current stream after every earlier use of ``table`` on another stream (its upload,
    launches that read it or move its counters), and tell the allocator the current stream uses its memory.
    Call right before each launch; no-op on CPU tensors and during capture (a capture's tables are its own)."""
    t = table.table
    if t.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    current = torch.cuda.current_stream(t.device)
    last = table.last_stream[0]
    if last is not None and last != current:
        current.wait_stream(last)
        t.record_stream(current)
        if table.counters is not None:
            table.counters.record_stream(current)
    table.last_stream[0] = current


class _LRU(OrderedDict):
    """Keeps the ``capacity`` newest insertions. Insertion and eviction hold a lock (threads may launch at once:
    unlocked, another thread's eviction between the insertion and ``move_to_end`` raised a KeyError)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._lock = threading.Lock()

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            while len(self) > self.capacity:
                self.popitem(last=False)


# The mappings a launch takes as its ``cache``, by the id of their class (their methods run after the checks): a
# dict, and this package's own (see ``fused_ops/_ops.py``, which adds its bounded cache).
CACHE_TYPES: set[int] = {id(dict), id(_LRU)}


# Used when the caller does not pass a cache of its own. Optimizers pass their own dict, so that the
# tables a captured CUDA graph reads stay alive as long as the optimizer does.
_DEFAULT_CACHE: MutableMapping = _LRU(capacity=32)


@contextlib.contextmanager
def counters_reset_on_error(table: ChunkTable):
    """Around a launch whose programs count their arrivals in ``table.counters`` (zeros between launches): a launch
    that raises part way (the interpreter on ``KeyboardInterrupt``) leaves some counters moved, and every later
    launch on the cached table would take a tensor's first program for its last; they are zeroed again."""
    try:
        yield
    except BaseException:
        if table.counters is not None:
            table.counters.zero_()
        raise


def build_chunk_table(
    roles: Sequence[Sequence[torch.Tensor]],
    chunk_size: int,
    cache: MutableMapping | None = None,
    check: Callable[[], None] | None = None,
    with_counters: bool = False,
) -> ChunkTable:
    """Return the chunk table of ``roles`` (a list of same-length tensor lists), cached by address.

    Every tensor of tensor index ``t`` must have the same number of elements in every role and be
    contiguous; all tensors must be on one device. Tensors with no elements get no chunk, unless
    ``with_counters``: then every tensor gets at least one program, and the table carries one int32 arrival
    counter per tensor (zeros) with which the last program of a tensor can tell it is last (kernels that do
    per-tensor work once per launch, such as incrementing a step count, and reset the counter). ``check`` is
    called on every call, before the look-up: the table is cached, the validation never is (a cached address
    may hold another tensor now). See the module docstring for CUDA-graph capture and streams.
    """
    if chunk_size <= 0 or chunk_size % 16:
        # Kernels tell the compiler that chunk starts are multiples of 16 elements (vectorised accesses).
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size}")
    if cache is not None and id(type(cache)) not in CACHE_TYPES:
        # (its get and __setitem__ would run after the checks and the addresses' reads: probe 78)
        raise TypeError(f"cache must be a dict or None, got {type(cache).__name__}: a mapping of the caller's runs "
                        "its own code after the launch's checks")  # fmt: skip
    if check is not None:
        check()
    first = roles[0]
    n_tensors = len(first)
    numels = [t.numel() for t in first]
    addrs = [t.data_ptr() for role in roles for t in role]
    device = first[0].device if n_tensors else torch.device("cpu")
    key = (tuple(addrs), tuple(numels), chunk_size, device, with_counters)
    if cache is None:
        cache = _DEFAULT_CACHE
    hit = cache.get(key)
    capturing = is_capturing(device)
    if hit is not None:
        return keep_for_capture(hit) if capturing else hit
    if capturing:
        raise RuntimeError(
            "fused_ops: these tensors have no chunk table yet and one cannot be built during CUDA graph capture "
            "(it pins host memory and uploads it); run the same call once eagerly (a warm-up) before capturing"
        )

    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    for t, n in enumerate(numels):
        starts = range(0, max(n, 1) if with_counters else n, chunk_size)
        chunk_tensor.extend([t] * len(starts))
        chunk_start.extend(starts)
    n_chunks = len(chunk_tensor)
    host = torch.tensor(addrs + numels + chunk_tensor + chunk_start, dtype=torch.int64)
    if device.type == "cuda":
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    numel_offset = len(addrs)
    result = ChunkTable(
        table=table,
        n_tensors=n_tensors,
        n_chunks=n_chunks,
        numel_offset=numel_offset,
        chunk_tensor_offset=numel_offset + n_tensors,
        chunk_start_offset=numel_offset + n_tensors + n_chunks,
        aligned=all(a % 16 == 0 for a in addrs),
        counters=torch.zeros(n_tensors, dtype=torch.int32, device=device) if with_counters else None,
        role_aligned=tuple(all(a % 16 == 0 for a in addrs[r * n_tensors : (r + 1) * n_tensors])
                           for r in range(len(roles))),
        host=host,
    )  # fmt: skip
    if device.type == "cuda":
        # The upload and the counters' zeroing are queued on the current stream: a first launch on another stream
        # (a prepared launch built on one stream, run on another) must wait for them (use_on_current_stream).
        result.last_stream[0] = torch.cuda.current_stream(device)
    cache[key] = result
    return result


def repoint_role(table: ChunkTable, role: int, addrs: list[int]) -> ChunkTable:
    """Write new addresses for every tensor of ``role`` into ``table`` (in place); return the updated table.

    For a table that a caller owns (built with a private ``cache``, never shared: a shared table is found by
    its old addresses) whose tensors of one role moved, e.g. gradients that backward allocates afresh every
    step, with the same sizes (the caller checks). Costs one small host-to-device copy (from pinned memory,
    asynchronous) instead of a rebuild; the copy is ordered on the current stream after the launches that read
    the old addresses. Not during CUDA graph capture: a captured graph must read a table nothing rewrites
    (see :func:`capture_copy`).
    """
    n = table.n_tensors
    if len(addrs) != n:
        raise ValueError(f"repoint_role: {len(addrs)} addresses for a table of {n} tensors")
    if is_capturing(table.table.device):
        raise RuntimeError("repoint_role: a table is never rewritten during CUDA graph capture (use capture_copy)")
    host = torch.tensor(addrs, dtype=torch.int64)
    dst = table.table[role * n : (role + 1) * n]
    use_on_current_stream(table)
    if dst.device.type == "cuda":
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)
    if table.host is not None and table.host is not table.table:
        table.host[role * n : (role + 1) * n] = host
    role_aligned = list(table.role_aligned)
    role_aligned[role] = all(a % 16 == 0 for a in addrs)
    return dataclasses.replace(table, aligned=all(role_aligned), role_aligned=tuple(role_aligned))


def capture_copy(table: ChunkTable, staging: torch.Tensor) -> ChunkTable:
    """A copy of ``table`` for a CUDA graph being captured: its own device table and arrival counters, allocated
    in the graph's pool, filled from ``staging`` (pinned int64 host memory of the table's length, allocated
    before the capture: pinning during a capture is not allowed). Every replay copies ``staging`` again, so the
    caller keeps ``staging`` and the returned table alive as long as the graph and never writes ``staging``
    again; the original table may then be rewritten (``repoint_role``) for eager launches without the graph
    seeing it."""
    if table.host is None or staging.numel() != table.host.numel():
        raise ValueError("capture_copy: staging must have the table's length")
    staging.copy_(table.host)
    device_table = torch.empty_like(table.table)
    device_table.copy_(staging, non_blocking=True)
    counters = None if table.counters is None else torch.zeros_like(table.counters)
    return keep_for_capture(dataclasses.replace(table, table=device_table, counters=counters, last_stream=[None]))


class GradMismatchError(TypeError, ValueError):
    """A new grad of another type, dtype or device than a prepared launch was built for: a TypeError, and the
    ValueError that ``AdamStep.set_grads`` has always raised for a grad that does not fit."""


_T = torch.Tensor
# (the boolean arguments of the prepared launches' ``_run``: read as truth values)
_FLAG_ARGUMENTS = frozenset({"maximize", "decoupled", "nesterov", "first_step"})


class PreparedLaunch:
    """A multi-tensor launch over one fixed set of tensors whose grads alone may move between steps (the machinery
    of ``AdamStep``, ``AdamLowbitStep``, ``SGDStep`` and ``LionStep``).

    The table is built once (every input checked once) and owned; :meth:`set_grads` checks new grads and, when they
    moved, rewrites their addresses in the table with one small copy. Each CUDA graph capture launches on a copy of
    the table of its own (``capture_copy``), filled from a pinned staging buffer prepared by the eager step before
    it, and kept with the copy for the life of this object.

    A call (``step(...)``) first checks that every tensor the table points at is still what the table says: the
    params, states and masters (kept here) at the table's address, with their element count, dtype and device, and
    contiguous (one resized in place, ``set_()`` or given another ``.data`` is refused: the launch would write
    memory that is not the tensor's any more), and the grads of the last :meth:`set_grads` (or of the constructor)
    alive and the same (watched through weak references, not kept alive). The fused optimizers, which check all of
    that in their step plans at every step, launch through ``_run`` instead.
    """

    def __init__(self, roles: list, grad_role: int, chunk_size: int, block_size: int,
                 with_counters: bool = False, names: Sequence[str] | None = None) -> None:  # fmt: skip
        params, grads = roles[0], roles[grad_role]
        # No written tensor (every role but the grads) may share memory with another tensor of the launch: checked
        # here and for new grads in set_grads; a direct call then checks that every address is unchanged.
        self._role_names = list(names) if names is not None else [f"role {r}" for r in range(len(roles))]
        check_roles_memory(type(self).__name__, roles, self._role_names, grad_role)
        self._written_roles = [(self._role_names[r], list(role), True) for r, role in enumerate(roles)
                               if r != grad_role]  # fmt: skip
        self.table = build_chunk_table(roles, chunk_size, cache={}, with_counters=with_counters)
        self.param0 = params[0]
        self.device = params[0].device
        self.grad_dtype = grads[0].dtype
        self.numels = [p.numel() for p in params]
        self.grad_addrs = [g.data_ptr() for g in grads]
        self.grad_role = grad_role
        self.chunk_size = chunk_size
        self.block_size = block_size
        self._staging: torch.Tensor | None = self._new_staging()
        self._captured: list = []
        # The grads the next launch reads: set_grads' latest. During a capture the eager table is not rewritten (the
        # capture gets a copy with these); the next eager launch repoints it first (``launch_table``), so an eager
        # step after a capture whose grads moved never reads the grads from before the capture.
        self._want_grad_addrs: list[int] = self.grad_addrs
        # what a direct call checks (see the class docstring): the tensors (kept, not copied), their roles' dtypes
        self._watched = [t for r, role in enumerate(roles) if r != grad_role for t in role]
        self._watched_roles = [r for r, role in enumerate(roles) if r != grad_role for _ in role]
        self._watched_numels = [t.numel() for t in self._watched]  # (step counts and 8-bit scales: not the params')
        self._role_dtypes = [role[0].dtype for role in roles]
        self._written_spans: tuple[list[int], list[int]] | None = None  # (built by the first direct call)
        self._watch_grads(grads)

    def _watch_grads(self, grads: Sequence[torch.Tensor] | None) -> None:
        """Watch ``grads`` (weak references) for the check of a direct call; None: the caller checks them itself."""
        self._grad_refs = None if grads is None else [weakref.ref(g) for g in grads]

    def check_current(self) -> list[torch.Tensor]:
        """Raise a ValueError unless every tensor of the table is still what the table says: at its address, with its
        element count, its role's dtype, on the device, contiguous; and the grads alive (see the class docstring).
        Returns the grads checked: the caller holds them until the launch (the table holds no reference to them)."""
        name = type(self).__name__
        table = self.table
        n = table.n_tensors
        addrs = table.host[: table.numel_offset].tolist()
        addrs[self.grad_role * n : (self.grad_role + 1) * n] = self._want_grad_addrs  # (what the launch will read)

        def fits(t: torch.Tensor, r: int, i: int, numel: int) -> bool:
            # (and inside its storage: one freed and allocated again smaller in place can keep its address)
            # (torch.Tensor's own methods, unbound: a method set on the object or by its class is not called)
            return (isinstance(t, torch.Tensor) and _T.data_ptr(t) == addrs[r * n + i] and _T.numel(t) == numel
                    and _T.dtype.__get__(t) == self._role_dtypes[r] and _T.device.__get__(t) == self.device
                    and _T.is_contiguous(t) and inside_storage(t))  # fmt: skip

        for k, t in enumerate(self._watched):
            if not fits(t, self._watched_roles[k], k % n, self._watched_numels[k]):
                raise ValueError(
                    f"{name}: tensor {k % n} of role {self._watched_roles[k]} (a param, state or master) was resized, "
                    "moved or changed since the launch was prepared (its address, element count, dtype, device, "
                    "contiguity, or its storage freed or shrunk in place): prepare a new launch"
                )
        if self._grad_refs is None:
            raise ValueError(f"{name}: call set_grads() with this step's grads before calling the launch")
        live = []
        for i, ref in enumerate(self._grad_refs):
            g = ref()
            if g is None or not fits(g, self.grad_role, i, self.numels[i]):
                raise ValueError(f"{name}: grads[{i}] was freed or changed since set_grads(): call set_grads() with "
                                 "this step's grads")  # fmt: skip
            live.append(g)
        return live

    def __call__(self, **kwargs) -> None:
        """One step: :meth:`check_current` and the 1-element tensors the kernel reads through a pointer (``lr``,
        ``grad_scale``, ``found_inf``: on the device, with memory, and sharing no byte with a tensor the launch
        writes: every program reads them while others write), then the launch (the subclass's ``_run``, whose
        arguments these are). The optimizers, which check their scalars against every plan's writes themselves, call
        ``_run``. No user code runs from the first check to the launch (:class:`NoUserCode`), and the grads checked
        are held until then."""
        with NoUserCode():
            kwargs = self._plain_arguments(kwargs)  # (before the first check: see plain_value)
            grads = self.check_current()  # held: a grad dropped now would be read freed by the launch
            scalars = [(key, kwargs[key]) for key in ("lr", "grad_scale", "found_inf")
                       if isinstance(kwargs.get(key), torch.Tensor)]  # fmt: skip
            for key, x in scalars:
                check_scalar(type(self).__name__, key, x, self.device)
            for key, x in scalars:
                self._check_not_written(key, x)
            self._run(**kwargs)
            del grads

    def _plain_arguments(self, kwargs: dict) -> dict:
        """The step's arguments as the launch reads them, made before the first check so that nothing after it runs
        a caller's Python code (a ``float`` subclass's ``__float__``, an object's ``__bool__``): the flags as bools,
        the numbers as exact floats or ints, tensors as they are (refused if they run code of their own when read:
        see ``check_no_overrides``); anything else is a TypeError naming it."""
        out = {}
        for key, x in kwargs.items():
            if key in _FLAG_ARGUMENTS:
                x = plain_flag(x, type(self).__name__, key)
            else:
                x = plain_value(x, f"{type(self).__name__}: {key}")
                if not (x is None or isinstance(x, int | float | torch.Tensor)):
                    raise TypeError(f"{type(self).__name__}: {key} must be a number or a 1-element tensor, got "
                                    f"{type(x).__name__}")  # fmt: skip
            out[key] = x
        # (the tensors checked once every argument is plain: a later argument's conversion, caller code, could set a
        # method on a tensor checked before it; probe 78)
        for key, x in out.items():
            if key not in _FLAG_ARGUMENTS and isinstance(x, torch.Tensor):
                check_no_overrides(type(self).__name__, key, [x], indexed=False)
        return out

    def _check_not_written(self, key: str, x: torch.Tensor) -> None:
        """Raise a ValueError naming the tensor when the bytes of scalar ``x`` overlap one the launch writes: a
        bisection in the written bytes, sorted and merged once (fixed: :meth:`check_current` has checked every
        written tensor's address, element count and dtype)."""
        if self._written_spans is None:
            merged: list[list[int]] = []
            for a, e in sorted((_DATA_PTR(t), _DATA_PTR(t) + t.nbytes) for t in self._watched if t.nbytes):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], e)
                else:
                    merged.append([a, e])
            self._written_spans = ([a for a, _ in merged], [e for _, e in merged])
        starts, ends = self._written_spans
        a, e = _DATA_PTR(x), _DATA_PTR(x) + x.nbytes
        k = bisect.bisect_left(starts, e) - 1  # (the last span starting before x ends)
        if k < 0 or ends[k] <= a or e <= a:
            return
        n = self.table.n_tensors
        for j, t in enumerate(self._watched):
            if t.nbytes and _DATA_PTR(t) < e and a < _DATA_PTR(t) + t.nbytes:
                other = f"{self._role_names[self._watched_roles[j]]}[{j % n}]"
                raise ValueError(
                    f"{type(self).__name__}: {other} and {key} share memory: the launch writes {other} "
                    f"while every program reads {key}; pass a separate tensor (e.g. {key}.clone())"
                )

    def _run(self, **kwargs) -> None:
        raise NotImplementedError

    def set_grads(
        self, grads: Sequence[torch.Tensor], addrs: list[int] | None = None, *, checked: bool = False
    ) -> None:
        """Point the launch at ``grads`` (same dtype, device and sizes as the first ones; contiguous, dense).

        ``addrs``: their ``data_ptr()`` values, when the caller has them already. Raises before changing anything
        if a grad does not fit, unless ``checked`` (the caller has just checked exactly that). Cheap when nothing
        moved (one list comparison). During CUDA graph capture the eager table is not rewritten: the capture
        copies the table with the new addresses (see ``launch_table``).
        """
        name = f"{type(self).__name__}.set_grads"
        if len(grads) != len(self.numels) or (addrs is not None and len(addrs) != len(self.numels)):
            raise ValueError(f"{name}: {len(grads)} grads for {len(self.numels)} params")
        if not checked:
            try:
                check_role(name, "grads", grads, (self.grad_dtype,), self.device, self.grad_dtype)
            except TypeError as e:  # (AdamStep's callers have caught ValueError for a grad that does not fit)
                raise GradMismatchError(str(e)) from None
            if list(map(torch.Tensor.numel, grads)) != self.numels:
                i, n = next((i, n) for i, (g, n) in enumerate(zip(grads, self.numels)) if g.numel() != n)
                raise ValueError(f"{name}: grads[{i}] has {grads[i].numel()} elements, params[{i}] has {n}")
            check_shared_memory(name, [*self._written_roles, ("grads", list(grads), False)])
        if addrs is None:
            addrs = [g.data_ptr() for g in grads]
        self._watch_grads(None if checked else grads)
        self._want_grad_addrs = list(addrs)
        if is_capturing(self.device):  # for the capture's own table; the eager table stays as it is
            return
        self._repoint_eager()

    def _repoint_eager(self) -> None:
        """Point the eager table at ``_want_grad_addrs`` (one small copy) when it points elsewhere."""
        want = self._want_grad_addrs
        if want is self.grad_addrs:  # (the common case: one identity test, no list comparison)
            return
        if want != self.grad_addrs:
            self.table = repoint_role(self.table, self.grad_role, list(want))
        self.grad_addrs = want

    def _new_staging(self) -> torch.Tensor:
        # pinned on CUDA (a capture copies from it at every replay); plain memory on the CPU (tests of this path)
        cuda = self.device.type == "cuda"
        return torch.empty(self.table.table.numel(), dtype=torch.int64, pin_memory=cuda)

    def launch_table(self) -> ChunkTable:
        """The table this step launches on: the eager one, or during a capture a copy of its own (current grads
        included) that nothing rewrites."""
        if not is_capturing(self.device):
            if self._staging is None:
                self._staging = self._new_staging()  # the last one went into a captured graph
            self._repoint_eager()  # (grads set during a capture: the eager table learns them now)
            return self.table
        if self._staging is None:
            raise RuntimeError(
                f"{type(self).__name__}: two CUDA graph captures with no eager step in between; run one eager step "
                "before each capture (it prepares the pinned buffer the capture's table is copied from)"
            )
        table = self.table
        want = self._want_grad_addrs
        if want != self.grad_addrs:  # grads set during this capture: the capture's copy gets them
            n, r = table.n_tensors, self.grad_role
            host = table.host.clone()
            host[r * n : (r + 1) * n] = torch.tensor(want, dtype=torch.int64)
            aligned = list(table.role_aligned)
            aligned[r] = all(a % 16 == 0 for a in want)
            table = dataclasses.replace(table, host=host, aligned=all(aligned), role_aligned=tuple(aligned))
        staging, self._staging = self._staging, None
        captured = capture_copy(table, staging)
        self._captured.append((captured, staging))
        return captured


@triton.jit
def tensor_pointer(table_ptr, role, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed base pointer of tensor ``t`` in ``role`` of a chunk table.

    With ALIGNED (the launcher checked that every address is a multiple of 16 bytes) the compiler is told so:
    with chunk starts that are multiples of 16 elements, full blocks then load and store 128 bits at a time.
    """
    ptr = tl.load(table_ptr + role * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # on the pointer: a hint on the integer does not survive the cast
    return ptr
