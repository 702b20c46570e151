"""ZeroAdamW: the class, its constructor and its arguments; the rest comes from the mixins of this package."""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._backend import check_backend
from .._exit import settle_at_exit
from .._ref_lowbit import QUANT_BLOCK
from .._validate import check_memory, has_memory
from ._agree import (
    _AgreementMixin,
    _check_group,
    _check_lowbit_amsgrad,
    _check_max_grad_norm,
    _real,
    _resolve_group_backend,
    _state_name,
)
from ._checkpoint import _CheckpointMixin
from ._dcp import _DCPMixin
from ._layout import _LayoutMixin
from ._reduce import _ReduceMixin, _release_params
from ._step import _StepMixin

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ZeroAdamW(
    _LayoutMixin, _ReduceMixin, _StepMixin, _CheckpointMixin, _DCPMixin, _AgreementMixin, torch.optim.Optimizer
):
    """AdamW with ZeRO stage 1 or 2 partitioning over a ``torch.distributed`` process group.

    Args:
        params: iterable of params or param-group dicts (as torch.optim.AdamW). Plain tensors with memory of
            their own (not DTensors nor other tensor subclasses, not meta), all on one device; fp32, bf16 or fp16;
            identical in number, shape, dtype, kind of device, group and order on every rank (checked,
            collectively). Their values may differ: every rank takes rank 0's at construction, as DDP does.
        process_group: the data-parallel group (default: the world group). Must be initialised.
        stage: 1 (shard optimizer states; grads reduce-scattered in ``step()``) or 2 (also shard grads: each
            bucket is reduce-scattered during backward as soon as its grads exist, and the full grads are freed).
        bucket_cap_mb: bucket size in MiB of param-dtype elements.
        overlap_comm: launch collectives asynchronously (two staging buffers), overlapping them with backward
            and with each other; ``False`` waits for each one.
        master_weights: keep an fp32 master shard for bf16/fp16 params (no effect on fp32 params).
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW.
        max_grad_norm: clip the global grad norm (over all ranks and param groups) to this, as
            ``torch.nn.utils.clip_grad_norm_`` would; ``None`` disables clipping. Clip here, not with
            ``clip_grad_norm_(model.parameters())`` before ``step()``: ``p.grad`` holds no averaged grad then (None
            after a synced backward in stage 2, this rank's unreduced grads in stage 1).
        reduce_dtype: dtype of the reduce-scatter and of this rank's reduced-grad shard, which accumulates the
            grads of several synced backward passes (default: each bucket's param dtype). With bf16/fp16 params,
            ``torch.float32`` costs 2 more bytes per param / N and sums in fp32: more accurate over many ranks or
            micro-batches accumulated without ``no_sync``. (A low-precision reduce dtype other than the params'
            reduces in that dtype into an fp32 shard.) The grad norm is accumulated in float64 either way.
        align: params start, and shards split, at multiples of this many elements (default 64; 256 with
            ``state_dtype="int8"``, which needs a multiple of 256).
        backend: fused-op backend ("auto", "triton", "reference"), as in FusedAdamW (``"triton"`` on CPU params
            without the Triton interpreter is refused on every rank, here and at each step).
        state_dtype: how this rank's shard of the moments is stored (FusedAdamW's option). ``None``/``"float32"``
            (default): fp32, the fp32 Adam kernel. ``"int8"``: uint8 codes with one fp32 scale (the absmax) per
            256-element block of the shard (Dettmers et al.'s block-wise dynamic quantisation, see
            ``fused_ops/_ref_lowbit.py``), dequantised, updated and requantised by the low-bit kernel
            (``kernels/adam_lowbit.py``; ``_ref_lowbit.adam_lowbit_`` on the reference backend), each param's piece
            of the shard one tensor of the launch. align is a multiple of 256, so every param and every shard starts
            on a block: the blocks are the params' own (as FusedAdamW(state_dtype="int8") cuts them), whatever the
            world size, and 8-bit checkpoints reshard without requantisation. ``"bfloat16"``: bf16 moments stored
            with stochastic rounding. Not with amsgrad (refused on every rank, in the constructor, ``step()`` and
            ``load_state_dict``).
        seed: the key of the random bits of stochastic rounding (bf16 moments). The bits also depend on the
            layout (each param's piece is a tensor of this rank's launch): reproducible for one seed and layout.
        foreach, fused, capturable: accepted for drop-in compatibility with torch.optim.AdamW and kept in the groups.
        differentiable: accepted for the same reason; only False: True raises ValueError.

    Memory, bytes per param on each of N ranks (``memory_report()`` lists what this object holds; ``p.grad``
    is autograd's)::

        params            stage  param  p.grad  shard: master + m + v + grad   total
        fp32                1      4      4        (0 + 4 + 4 + 4) / N         8 + 12/N
        fp32                2      4      0        (0 + 4 + 4 + 4) / N         4 + 12/N
        bf16 + fp32 master  1      2      2        (4 + 4 + 4 + 2) / N         4 + 14/N
        bf16 + fp32 master  2      2      0        (4 + 4 + 4 + 2) / N         2 + 14/N
          reduce_dtype=fp32 1      2      2        (4 + 4 + 4 + 4) / N         4 + 16/N
          reduce_dtype=fp32 2      2      0        (4 + 4 + 4 + 4) / N         2 + 16/N

    fp16 is as bf16; bf16 without master weights saves the 4/N of the master; amsgrad adds 4/N. Moments (m + v):
    8/N with fp32 states; ``state_dtype="bfloat16"`` 4/N; ``"int8"`` (2 + 8/256)/N (1 + 1 code bytes and two fp32
    scales per 256 elements; a param smaller than a block still has a block of its own). On top: the
    staging buffers of the reduce-scatters (two with ``overlap_comm`` and several buckets, else one; each holds
    the largest bucket, about ``bucket_cap_mb`` of param-dtype elements, in the reduce dtype: twice those bytes
    for bf16 params reduced in fp32), the padding of buckets to ``world_size * align``, 4 bytes per param
    tensor for step counts, and in stage 2 the grads of the buckets not yet launched during backward (stage 2
    frees ``p.grad`` as each bucket is launched).

    Differences from torch.optim.AdamW: params that get no grad in a step are stepped with a zero grad
    (weight decay and momentum apply), on every rank alike; in stage 2 ``p.grad`` is freed during backward
    (use ``last_grad_norm`` for logging), and after a step a param whose reduced grads are kept reads a zero tensor
    with zero strides (a sentinel, not a grad), None once this optimizer is freed (the kept grads were its shards,
    freed with it; its grad hooks go too); the model's params become views into flat buffers owned here.
    Use ``step(loss_scale=...)`` for loss scaling (``torch.amp.GradScaler`` checks overflow per rank, which
    cannot work with sharded grads, so it is refused).

    Ranks agree before anything changes. The constructor checks its arguments and params on each rank, then one
    all_gather_object compares every rank's arguments, hyper-parameters and param signatures: an error on any
    rank, or a difference, raises the same exception on every rank (never one rank alone, which would leave the
    others waiting in a collective), before any param is touched. Then, like DDP at construction, rank 0's params
    are broadcast into every rank's buckets (ranks may have initialised the model with different seeds; the
    user's param tensors hold rank 0's values afterwards, and fp32 master weights are made from them): ranks
    start from bit-identical params. ``step()`` checks its values and grads on every rank and agrees inside the
    all-reduce it runs anyway, including that the step values (lr, betas, eps, weight_decay, amsgrad, maximize,
    max_grad_norm, loss_scale) are bit-identical on every rank; ``load_state_dict`` (and ``load_dcp_state_dict``)
    checks the whole checkpoint and agrees in one all_gather_object. A failed call raises the same exception on
    every rank and leaves params, grads, states, step counts and the loss scaler as they were.

    Checkpoints: ``state_dict()`` (this rank's shard), ``consolidated_state_dict()`` (torch.optim.AdamW's layout,
    on one rank) and ``dcp_state_dict()`` (DTensors for ``torch.distributed.checkpoint``, resharded by DCP on
    load), each loaded with any world size by ``load_state_dict`` / ``load_dcp_state_dict`` (the object itself is
    not copied, pickled nor saved whole: ``copy.deepcopy(opt)``, ``torch.save(opt)`` raise a TypeError). Low-bit
    moments: ``state_dict()`` and ``dcp_state_dict()`` hold them as kept (bf16 tensors; 8-bit: uint8 codes under
    ``exp_avg_codes``/``exp_avg_sq_codes`` (never ``exp_avg``: a loader expecting fp32 moments refuses them; codes
    under ``exp_avg``, the old form, still load) and fp32 block scales under ``exp_avg_scale``/``exp_avg_sq_scale``,
    FusedAdamW's keys; in DCP the scales are 1-D DTensors of ceil(numel/256) blocks, ``Shard(0)``),
    ``consolidated_state_dict()`` gives fp32 moments (dequantised: torch.optim.AdamW and FusedAdamW load it).
    Loading copies codes whose blocks line up (always, between int8 ZeroAdamWs and from FusedAdamW's int8 state
    dict), quantises fp32/bf16 moments into an int8 ZeroAdamW and dequantises codes into an fp32/bf16 one. A DCP
    checkpoint of 8-bit moments loads into an int8 ZeroAdamW (any world size); DCP refuses it into an fp32/bf16
    one, and fp32 moments into an int8 one (a missing key): change state_dtype through
    ``consolidated_state_dict``.
    """

    _step_supports_amp_scaling = True  # so that GradScaler always calls step(), where it is refused clearly

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        process_group: Any = None,
        stage: int = 2,
        bucket_cap_mb: float = 25,
        overlap_comm: bool = True,
        master_weights: bool = True,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        reduce_dtype: torch.dtype | None = None,
        align: int | None = None,
        backend: str | None = None,
        state_dtype: str | torch.dtype | None = None,
        seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ZeroAdamW needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(backend='nccl' or 'gloo', ...) on every rank first"
            )
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):  # (before any collective)
            raise TypeError(f"ZeroAdamW: process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__} {process_group!r}")  # fmt: skip
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        if self.rank < 0:
            raise ValueError("ZeroAdamW: this process is not a member of process_group")
        settle_at_exit()  # (collectives follow: their worker threads get a moment at exit, see fused_ops._exit)
        # Every argument is checked on this rank first, then the ranks agree (one all_gather_object) before
        # anything changes: a rank raising alone would leave the others waiting in that collective.
        self._built = False
        error: Exception | None = None
        config, group_values = None, None
        try:
            if isinstance(stage, bool) or not isinstance(stage, numbers.Integral):  # (True == 1)
                raise TypeError(f"stage must be 1 or 2 (an int), got {type(stage).__name__} {stage!r}")
            if stage not in (1, 2):
                raise ValueError(f"stage must be 1 or 2, got {stage!r}")
            if not (isinstance(bucket_cap_mb, numbers.Real) and bucket_cap_mb > 0 and math.isfinite(bucket_cap_mb)):
                raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
            state = _state_name(state_dtype)
            if align is None:
                align = QUANT_BLOCK if state == "int8" else 64
            if isinstance(align, numbers.Integral) and not isinstance(align, bool):
                align = int(align)  # (numpy's ints, as flatten and FlatBuffer take them)
            if isinstance(align, bool) or not (isinstance(align, int) and align >= 1):
                raise ValueError(f"align must be a positive int, got {align!r}")
            if align * self.world_size * 4 > 2**63 - 1:  # (a bucket pads to world_size * align fp32 elements)
                raise ValueError(f"align={align} pads each bucket to {align * self.world_size} elements "
                                 f"(world_size * align), more bytes than a tensor can hold (2**63 - 1)")  # fmt: skip
            if state == "int8" and align % QUANT_BLOCK:
                raise ValueError(
                    f"state_dtype='int8' needs align a multiple of {QUANT_BLOCK} (got {align}): its block scales "
                    f"cover {QUANT_BLOCK} elements of each param, so every param and shard must start on a block "
                    f"(the default align with int8 states is {QUANT_BLOCK})"
                )
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
                raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
            max_grad_norm = _check_max_grad_norm(max_grad_norm)
            if reduce_dtype is not None and reduce_dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"reduce_dtype must be one of {_SUPPORTED_DTYPES}, got {reduce_dtype}")
            if differentiable:
                raise ValueError("differentiable=True is not supported")
            if isinstance(betas, (tuple, list)) and len(betas) == 2:
                betas = (_real("betas[0]", betas[0]), _real("betas[1]", betas[1]))
            defaults = dict(
                lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
                decoupled_weight_decay=True, backend=check_backend(backend),
            )  # fmt: skip
            _check_group(0, defaults, read_lr=True)
            self.state_dtype = state
            super().__init__(params, defaults)
            self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
            self._group_of: list[int] = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
            # The groups as laid out: step() checks that param_groups still holds exactly these params.
            self._group_params: list[tuple[Tensor, ...]] = [tuple(g["params"]) for g in self.param_groups]
            bad_params = self._local_param_error()
            if bad_params is not None:
                raise ValueError(f"bad params: {bad_params}")
            config = (stage, float(bucket_cap_mb), align, bool(master_weights), str(reduce_dtype), self.world_size,
                      max_grad_norm, state)  # fmt: skip
            group_values = []
            device = self._params[0].device if self._params else torch.device("cpu")
            for gi, g in enumerate(self.param_groups):
                lr_, beta1, beta2, eps_, weight_decay_ = _check_group(gi, g, read_lr=True)
                _check_lowbit_amsgrad(gi, g, state)
                _resolve_group_backend(gi, g, device)  # (step() resolves it again: the environment may change)
                lr_ = float(lr_.item()) if isinstance(lr_, Tensor) else lr_
                group_values.append((lr_, beta1, beta2, eps_, weight_decay_, bool(g["amsgrad"]), bool(g["maximize"])))
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = e
        self._check_same_on_all_ranks(config, group_values, error)

        self.stage = stage
        self.bucket_cap_mb = bucket_cap_mb
        self.overlap_comm = bool(overlap_comm)
        self.master_weights = bool(master_weights)
        self.max_grad_norm = max_grad_norm
        self.reduce_dtype = reduce_dtype
        self.align = align
        self.seed = seed

        self._device = self._params[0].device if self._params else torch.device("cpu")
        self._warn_shared_storage()
        self._build()
        self._built = True

        # Step counts: one per param, kept (identically) on every rank, like torch's per-param 'step'.
        self._steps = [torch.zeros((), dtype=torch.float32, device=self._device) for _ in self._params]
        self.last_grad_norm = torch.zeros((), dtype=torch.float32, device=self._device)
        self.last_found_inf = torch.zeros((), dtype=torch.float32, device=self._device)
        self.skipped_steps = torch.zeros((), dtype=torch.float32, device=self._device)
        self._shifts = torch.arange(0, 64, 16, dtype=torch.int64, device=self._device)  # see _bit_pieces
        # What step() sends when this rank met a problem before an agreement (out of memory, say): allocated now, so
        # that it can always send a vector of the agreed size (see _agree_on_step and _agree_on_drops).
        self._agree_buf = torch.zeros(self._agreement_size(), dtype=torch.float64, device=self._device)
        self._drop_host = torch.zeros(2 * len(self._params) + 1, dtype=torch.float32)
        self._drop_buf = torch.zeros(2 * len(self._params) + 1, dtype=torch.float32, device=self._device)
        self._reduce_faults: list[Exception] | None = None  # during step()'s reductions: the problems met there
        self._gather_pending = False  # a step updated the shards but its all-gather of the params failed

        self._sync_grads = True
        self._grad_errors: dict[int, tuple[str, str]] = {}  # param index -> (type, message), raised by step()
        self._round_open = False
        self._next_bucket = 0
        self._rounds_since_step = 0  # synced backward passes since the last step (zero_grad keeps the count)
        self._unsynced_grads = False
        # zero_grad() was called after the last synced backward pass (stage 2), or after a backward since the last
        # step (stage 1: a backward since does not reset it, see _zeroed_since_step)
        self._zeroed = False
        self._grad_marks: list = [None] * len(self._params)  # stage 1: p.grad as the last step / zero_grad left it
        # Stage 2, per param: whether this rank's grad shards hold grads of it (reduced and freed from p.grad: by a
        # synced pass, or by a step, kept without zero_grad as torch keeps p.grad) that p.grad no longer shows; the
        # p.grad tensor the grad hooks last saw (a ``_Seen``); and whether a grad set by hand since replaces them.
        self._held: list[bool] = [False] * len(self._params)
        self._seen: list[Any] = [None] * len(self._params)
        self._replaced: set[int] = set()
        # Stage 2, per param: whether some rank held grads of it when the last step committed (the same on every
        # rank: agreed by the step, see _held_after_step; dropped by zero_grad), and what the step's agreement found.
        self._held_any: list[bool] = [False] * len(self._params)
        self._held_agreed: list[bool] = []
        self._held_alike_agreed = self._held_alike = True  # (every rank holds grads of the same params: none yet)
        # Stage 2: after a step, a param with held grads gets a sentinel as p.grad instead of None (see
        # ``_give_sentinels``), so that ``model.zero_grad()`` or ``p.grad = None`` can be told from nothing done.
        self._sentinels = self._make_sentinels() if stage == 2 else []
        self._given: list[int | None] = [None] * len(self._params)  # the sentinel's _version when given, or None
        self._outstanding = False  # sentinels given and not looked at yet by a backward pass (_clear_if_all_zeroed)
        self._cleared_all = False  # since the last step: every held grad zeroed by the user, the shards dropped
        self._kept_old = False  # since the last step: a held grad's sentinel found untouched (kept)
        self._round_header: tuple | None = None  # (vector, work) of the all-reduce opening a second synced pass
        # a rank stepped while this one began another synced pass: (ranks beginning it, ranks that had zeroed)
        self._round_mismatch: tuple[int, int] | bool = False
        self._inflight: deque = deque()
        self._param_versions = [p._version for p in self._params]  # writes into the params: see _refreshed_masters
        self._hook_handles: list[Any] = []
        self._unhooked = [s for b in self._buckets for s in b.slots]  # stage 2: params without a grad hook yet
        if stage == 2:
            # Once this object is freed: its grad hooks and their ``_HOOKS`` entries go, and so do its sentinels still
            # in p.grad (see ``_release_params``; the finalizer holds these lists, never self). Not at exit: nothing
            # to give back then.
            weakref.finalize(self, _release_params, self._params, self._sentinels, self._hook_handles).atexit = False
            self._register_hooks()

    # -- construction ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group while constructing; afterwards the flat layout is fixed and this raises."""
        if getattr(self, "_built", False):
            raise NotImplementedError("ZeroAdamW: param groups cannot be added after construction")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _, beta1, beta2, _, _ = _check_group(len(self.param_groups), merged, read_lr=True)
        if "betas" in param_group:
            param_group = {**param_group, "betas": (beta1, beta2)}
        super().add_param_group(param_group)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused: ``copy.copy``, ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole object all come here.
        torch.optim's ``__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``: a copy would hold none
        of the shards (master weights, moments, grads, step counts live outside ``opt.state``) and fail in every method.
        A working copy is not meaningful either: this object is bound to its process group and to the flat buffers its
        params are views of. (torch.optim's ``__getstate__``/``__setstate__``, which its ``load_state_dict`` calls, are
        left as they are.)"""
        name = type(self).__name__
        raise TypeError(
            f"{'ZeroAdamW' if name == 'ZeroAdamW' else f'{name} (a ZeroAdamW)'} cannot be copied, pickled or saved "
            "whole (copy.copy, copy.deepcopy, pickle, torch.save(opt)): it is bound to its process group and to the "
            "flat buffers its params are views of, and its states live outside opt.state. Save opt.state_dict() (this "
            "rank's shard), opt.consolidated_state_dict() (torch.optim.AdamW's layout, on one rank) or "
            "opt.dcp_state_dict() (for torch.distributed.checkpoint) instead, and load it into a new ZeroAdamW with "
            "load_state_dict() / load_dcp_state_dict()"
        )

    def _warn_shared_storage(self) -> None:
        """ZeroAdamW moves each param into its flat buffer (``p.data`` becomes a view of it), where torch.optim updates
        params where they are: a param that is part of a larger storage (a ``FlatBuffer.from_params`` view, a slice of
        another tensor, another ZeroAdamW's bucket) leaves it, and that storage no longer sees the param's updates.
        Allowed (ZeRO needs the params in its own layout), said once."""
        shared = [i for i, p in enumerate(self._params)
                  if p.numel() and p.untyped_storage().nbytes() > p.numel() * p.element_size()]  # fmt: skip
        if shared:
            first = self._params[shared[0]]
            warnings.warn(
                f"ZeroAdamW: {len(shared)} param(s) (param {shared[0]}, shape {tuple(first.shape)}, first) are part "
                "of a larger storage (a view of a FlatBuffer or of another tensor, or the flat buffer of an earlier "
                "ZeroAdamW over these params, where nothing is lost): ZeroAdamW moves each param into its own flat "
                "buffer (p.data becomes a view of it), so that storage will no longer see the params' updates; read "
                "the params themselves (or give ZeroAdamW params with storages of their own)",
                UserWarning,
                stacklevel=2,
            )

    def _local_param_error(self) -> str | None:
        for i, p in enumerate(self._params):
            # (before anything reads a param's elements or address: the checks below, the layout, the broadcast)
            where = f"param {i} (group {self._group_of[i]}, shape {tuple(p.shape)})"
            if not has_memory(type(p)):
                raise TypeError(
                    f"{where} is a {type(p).__name__}, not a tensor with memory of its own: ZeroAdamW lays plain "
                    "params out in flat buffers and shards them itself; pass plain tensors or Parameters (FusedAdamW "
                    "takes DTensor params, e.g. FSDP2's)"
                )
            if p.is_meta:
                raise TypeError(
                    f"{where} is a meta tensor (no memory, no values): materialise the model (e.g. "
                    "model.to_empty(device=...) and initialise it) before building ZeroAdamW"
                )
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            return f"all params must be on one device, got {sorted(str(d) for d in devices)}"
        first: dict[int, int] = {}
        for i, p in enumerate(self._params):
            j = first.setdefault(id(p), i)
            if j != i:
                raise ValueError(
                    f"param {i} (group {self._group_of[i]}, shape {tuple(p.shape)}) is the same tensor as param {j} "
                    f"(group {self._group_of[j]}): each param may be given once (a ZeRO bucket holds each param's "
                    "elements once, and one tensor cannot be a view of two places)"
                )
        for i, p in enumerate(self._params):
            if p.dtype not in _SUPPORTED_DTYPES:
                return f"param {i} (shape {tuple(p.shape)}) is {p.dtype}; supported: fp32, bf16, fp16"
            if p.is_sparse:
                return f"param {i} is sparse"
        params = list(self._params)
        try:  # (a param that is a view of another, tied weights: each would get its own slot, untied silently)
            check_memory("ZeroAdamW", [("params", params, True, True, all(p.is_contiguous() for p in params))])
        except (ValueError, TypeError) as e:
            return f"{e} (each param gets a place of its own in the flat buffer: tied params would be untied)"
        return None
