"""FusedAdam and FusedAdamW: drop-in ``torch.optim.Adam`` / ``AdamW`` over the fused multi-tensor step.

Same constructor, defaults and ``state_dict`` layout as torch.optim, and torch's argument checks (plus a refusal
of non-finite or negative hyper-parameters), so code, lr schedulers, ``torch.amp.GradScaler`` and checkpoints move
between them. Differences, by design: moments are fp32 whatever the param dtype (bf16 params keep fp32 moments)
unless ``state_dtype`` asks for bf16 or 8-bit ones, per-param ``step`` counts are
fp32 tensors on the param's device (as in torch's fused/capturable modes), and a whole step is one kernel
launch per (device, dtype) group with no host synchronisation. The machinery (checks, plans, state dicts) is
:class:`~fused_ops.optim._base.FusedOptimizer`'s; this file holds Adam's hyper-parameters, states and update.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import _ops, functional
from .._backend import check_backend
from .._ref_lowbit import dequantize_blockwise, n_scales, quantize_blockwise_unclipped
from .._validate import finite_fp32 as _finite_fp32
from ._base import (
    MASTER_KEY,
    FusedOptimizer,
    _check_betas,
    _check_state_shape,
    _is_dtensor,
    _local,
    _off_mesh,
    _on_mesh,
    _Part,
    _same_ranks,
    _spec,
    _StepGroup,
    _stored,
    _to_float,
    _write_back,
    _zeros_like,
)

_SCALE_KEYS = ["exp_avg_scale", "exp_avg_sq_scale"]  # the block scales of 8-bit moments
# In state dicts, 8-bit codes are saved under keys of their own: a loader expecting fp32 moments under ``exp_avg``
# (torch's AdamW, DCP filling an fp32 optimizer's dict, which casts what it reads to the template's dtype) finds
# none, instead of reading the codes 0..255 as moments.
_CODES_KEYS = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}
_LAYOUT_KEY = "int8_layout"  # in state dicts only: the DTensor layout 8-bit states of a DTensor param were saved on
_KAHAN_KEY = "kahan_comp"
_STATE_TORCH_DTYPES = {"int8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}
_STATE_NAMES = {None: "fp32", "fp32": "fp32", "float32": "fp32", torch.float32: "fp32", "int8": "int8",
                "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16"}  # fmt: skip


def _scale_layout(p: Tensor) -> tuple[tuple, int, torch.Size]:
    """How the block scales of an 8-bit state of DTensor param ``p`` are laid out: ``(placements, count, shape)``.

    Blocks are 256 consecutive elements of each local shard (the kernel's blocks; no block spans two ranks). A
    rank's scales are its shard's, zero-padded to ``count``, the block count of the largest shard the layout can
    give (from the param's shape, mesh and placements alone: the same on every rank), so that the scales of all
    ranks form one DTensor of ``shape``, sharded (``Shard(0)``) over the mesh dims that shard the param and
    replicated over the others. DCP then saves and loads the scales as it does the codes, on the same layout.
    """
    from torch.distributed.tensor import Replicate, Shard

    largest, groups, placements = list(p.shape), 1, []
    for dim, pl in enumerate(p.placements):
        if pl.is_replicate():
            placements.append(Replicate())
            continue
        size = p.device_mesh.size(dim)  # (Shard, _StridedShard, which torch 2.13 does not count as a Shard)
        if isinstance(getattr(pl, "dim", None), int):
            largest[pl.dim] = -(-largest[pl.dim] // size)
        groups *= size
        placements.append(Shard(0))
    count = n_scales(math.prod(largest))
    return tuple(placements), count, torch.Size([groups * count])


def _check_scale_layout(p: Tensor, where: str) -> None:
    """Every shard of ``p`` has at most the block count :func:`_scale_layout` pads to (a layout whose shards it does
    not bound is refused, before any state is made)."""
    count = _scale_layout(p)[1]
    if n_scales(p._local_tensor.numel()) > count:
        raise TypeError(f"state_dtype='int8': {where} is a DTensor whose local shard ({tuple(p._local_tensor.shape)}) "
                        f"is larger than its placements {tuple(p.placements)} allow for ({count} blocks of 256); use "
                        "fp32 or bf16 states for it")  # fmt: skip


def _layout_tag(p: Tensor) -> str:
    """The layout of a DTensor param's shards, as a state dict records it with its 8-bit states: its codes and scales
    load only onto the same layout (the same on every rank)."""
    return f"shape {tuple(p.shape)}, mesh {tuple(p.device_mesh.shape)}, placements {tuple(p.placements)}"


def _dequantized(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """fp32 values of 8-bit ``codes``; for DTensor codes, each shard's from its own scales, as a DTensor like
    ``codes``."""
    if not _is_dtensor(codes):
        return dequantize_blockwise(codes, scales, signed).reshape(codes.shape)
    from torch.distributed.tensor import DTensor

    local = codes._local_tensor
    values = dequantize_blockwise(local, _local(scales)[: n_scales(local.numel())], signed).view(local.shape)
    return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                              stride=codes.stride())  # fmt: skip


def _quantized(x: Tensor, p: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, scales)`` of fp32 ``x`` shaped like ``p`` (a loaded moment); for a DTensor param (``x`` laid out like
    it), DTensors (codes like ``p``, scales as :func:`_scale_layout` lays them out) quantised shard by shard. Scales
    that clip nothing (:func:`~fused_ops._ref_lowbit.quantize_blockwise_unclipped`): dequantised 8-bit states load
    back as the same codes and scales, however many save/load cycles they go through."""
    if not _is_dtensor(p):
        return quantize_blockwise_unclipped(x, signed)
    from torch.distributed.tensor import DTensor

    codes, scales = quantize_blockwise_unclipped(_local(x), signed)
    placements, count, shape = _scale_layout(p)
    padded = torch.zeros(count, dtype=torch.float32, device=scales.device)
    padded[: scales.numel()] = scales
    return (
        DTensor.from_local(codes, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()),
        DTensor.from_local(padded, p.device_mesh, placements, run_check=False, shape=shape, stride=(1,)),
    )


def _stale_kahan(st: Any, p: Tensor) -> bool:
    """Whether the state ``st`` of ``p`` holds a Kahan buffer of the other low-precision dtype (a bf16 model made fp16
    by ``model.half()``, or back): it carried what rounding to the old dtype lost, which the cast rounded anew, so it
    is dropped (and a fresh one made), as the buffer of a param that became fp32 is. A buffer of any other dtype is
    no stale one and is refused as a state of the wrong dtype."""
    t = st.get(_KAHAN_KEY) if isinstance(st, dict) else None
    return isinstance(t, Tensor) and t.dtype in (torch.bfloat16, torch.float16) and t.dtype != p.dtype


def _holds_codes(st: dict[str, Any]) -> bool:
    """Whether param state ``st`` holds 8-bit moments (uint8 codes under ``exp_avg``)."""
    codes = st.get("exp_avg")
    return isinstance(codes, Tensor) and codes.dtype == torch.uint8


def _scales_count_message(key: str, where: str, p: Tensor, value: Tensor) -> str:
    return (f"loaded state dict: state {key!r} of {where} must be a dense torch.float32 tensor of "
            f"{n_scales(p.numel())} elements, got {value.dtype} with {value.numel()}")  # fmt: skip


def _used_scales(scales: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """The scales the kernel reads: a DTensor shard's own (its padding left out) for every local param."""
    return [s if s.numel() == n_scales(p.numel()) else s[: n_scales(p.numel())] for s, p in zip(scales, params)]


def _group_state(group: dict[str, Any]) -> Any:
    """A group's ``state_dtype`` in its normal spelling ("fp32", "bf16", "int8"); as it is when it has none (the
    step's check refuses it). The group is not rewritten: a step that raises leaves it as it was."""
    value = group.get("state_dtype")
    try:
        return _STATE_NAMES[value]
    except (KeyError, TypeError):
        return value


def _state_name(state_dtype: Any) -> str:
    try:
        return _STATE_NAMES[state_dtype]
    except (KeyError, TypeError):
        raise ValueError(f"state_dtype must be None/'float32', 'bfloat16' or 'int8', got {state_dtype!r}") from None


class FusedAdam(FusedOptimizer):
    """Adam (L2 weight decay) or, with ``decoupled_weight_decay=True``, AdamW, fused.

    Args:
        params: iterable of parameters or of param-group dicts, as for torch.optim.Adam.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam (``lr`` may be a 1-element
            tensor; keep it on the params' device to avoid a host read each step).
        foreach, fused: accepted for drop-in compatibility and ignored (the step is always fused).
        capturable: accepted; the step never synchronises with the host, so it can always be captured
            in a CUDA graph once the state exists (after one warm-up step).
        differentiable: must be False (not supported).
        decoupled_weight_decay: AdamW's decoupled decay; ``None`` (default): False for ``FusedAdam``, as torch's
            default (``FusedAdamW`` sets True).
        master_weights: keep an fp32 master copy of every bf16/fp16 param (state key ``"master_param"``,
            ignored by torch.optim). The whole update is one pass: read the low-precision grad, update
            master and moments in fp32, write the param rounded to nearest even. Without it, bf16 params
            lose updates smaller than half an ulp. fp32 params need no master and get none. Writes into the
            params between steps (``model.load_state_dict``, an in-place re-init or clamp, ``p.data = ...``,
            ``vector_to_parameters``) are kept: the next eager step takes every written element into the master
            first. Not seen: writes through ``p.data`` (``p.data.copy_(...)``: ``.data`` has a version counter of
            its own) and writes just before a compiled step; for those, load the weights through the
            optimizer's ``load_state_dict`` or build the optimizer after the write (README, "Master weights").
        backend: "auto" (Triton kernels on CUDA, plain torch on CPU), "triton" or "reference"; default
            from the ``FUSED_OPS_BACKEND`` environment variable.
        state_dtype: how the moments are stored. ``None``/``"float32"`` (default): fp32. ``"int8"``: 8-bit codes
            with one fp32 scale per block of 256 elements (state keys ``exp_avg``/``exp_avg_sq`` hold uint8 codes,
            saved in state dicts as ``exp_avg_codes``/``exp_avg_sq_codes``; ``exp_avg_scale``/``exp_avg_sq_scale``
            the scales; Dettmers et al.'s block-wise dynamic quantisation,
            see ``fused_ops/_ref_lowbit.py``), dequantised, updated and requantised in the same one-launch kernel,
            for every tensor however small: 2.03 bytes per param instead of 8. ``"bfloat16"``: bf16 moments
            stored with stochastic rounding (4 bytes). Not with amsgrad. On DTensor params (FSDP2, tensor
            parallel) every shard has its own blocks; see ``state_dict`` for checkpoints.
        stochastic_rounding: bf16/fp16 params without master weights are stored with stochastic rounding (the
            update in fp32, unbiased rounding seeded from the step counts on the device: reproducible for a
            ``seed``, new bits at every step and every CUDA-graph replay). Pure-bf16 training without masters.
        kahan_summation: instead, bf16/fp16 params without masters keep a compensation buffer of their dtype
            (state key ``kahan_comp``) that carries what rounding lost into the next step (as optimi does).
        seed: the key of the random bits of stochastic rounding.

    ``state_dict()`` saves low-bit states compactly (codes + scales); ``state_dict(dequantize=True)`` gives
    torch.optim.AdamW's layout (fp32 moments) that torch loads; loading a torch (fp32) dict quantises it. Set
    ``dequantize_state_dict = True`` on the optimizer to make that the default (e.g. for
    ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``, which calls ``state_dict()``, to save a
    checkpoint that can be resharded: 8-bit states of DTensor params are saved per shard and load only onto the
    layout they were saved on).

    Works with ``torch.amp.GradScaler`` without host sync: the scaler hands its scale and inf flag to the
    step, grads are unscaled inside the kernel and an overflowing step changes nothing.
    """

    _default_decoupled = False
    _required_state_keys = ("exp_avg", "exp_avg_sq")
    _foreign_state_keys = ("momentum_buffer",)
    dequantize_state_dict = False  # the default of ``state_dict(dequantize=...)``
    _LEGACY_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                            fused=None)  # fmt: skip

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
        state_dtype: str | torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        seed: int = 0,
    ) -> None:
        if differentiable:
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True (the fused step is not "
                "differentiable); use torch.optim.Adam(differentiable=True)"
            )
        if fused and foreach:  # (torch's check and message)
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        betas = _check_betas(betas, group=False)
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, master_weights=bool(master_weights), backend=backend,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation,
        )  # fmt: skip
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        self._seed = seed
        super().__init__(params, defaults)

    _own_group_keys = ("master_weights", "backend", "state_dtype", "stochastic_rounding", "kahan_summation")
    _unshaped_state_keys = tuple(_SCALE_KEYS)
    _pickled_attrs = ("_seed", "dequantize_state_dict")
    _rebuilt_state_keys = (MASTER_KEY, *_SCALE_KEYS, _KAHAN_KEY)  # (scales: of moments loaded in fp32, quantised)
    _transient_state_keys = (_KAHAN_KEY,)  # (Kahan turned off, then on: a fresh buffer, not the old residue)
    _seed = 0  # (the constructor's default: for a pickle of a version that did not keep it)

    # -- what FusedOptimizer asks of an optimizer -------------------------------------------------------------
    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] if group["amsgrad"] else ["exp_avg", "exp_avg_sq"]
        if _group_state(group) == "int8":
            keys += _SCALE_KEYS
        if group.get("kahan_summation"):
            keys.append(_KAHAN_KEY)
        return keys

    def _state_spec(self, group: dict[str, Any], key: str, p: Tensor) -> tuple[torch.dtype, int, torch.Size]:
        state = _group_state(group)
        local = _local(p).numel()
        if key in ("exp_avg", "exp_avg_sq") and state != "fp32":
            return _STATE_TORCH_DTYPES[state], local, p.shape
        if key in _SCALE_KEYS:
            if _is_dtensor(p):
                _, count, shape = _scale_layout(p)
                # (a rank outside the param's mesh holds no shard, so no scales: DTensor gives it empty locals)
                return torch.float32, count if p.device_mesh.get_coordinate() is not None else 0, shape
            return torch.float32, n_scales(local), torch.Size([n_scales(local)])
        if key == _KAHAN_KEY:
            return p.dtype, local, p.shape
        return torch.float32, local, p.shape

    def _state_distribution(self, group: dict[str, Any], key: str, p: Tensor) -> tuple:
        if key in _SCALE_KEYS and _is_dtensor(p):
            return p.device_mesh, _scale_layout(p)[0]
        return _spec(p)

    def _wants_state(self, group: dict[str, Any], key: str, p: Tensor) -> bool:
        return key != _KAHAN_KEY or (p.dtype != torch.float32 and not self._uses_master(group, p))

    def _check_state(self, where: str, p: Tensor, st: Any, group: dict[str, Any]) -> None:
        if _stale_kahan(st, p):  # (not read: the step drops it, see _init_state)
            st = {k: v for k, v in st.items() if k != _KAHAN_KEY}
        super()._check_state(where, p, st, group)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        state = self.state.get(p)
        if _stale_kahan(state, p):
            # Dropped, then made afresh by the base where the param keeps one; logged first, so that a step that
            # fails later (out of memory making it) puts the old buffer back with the rest of the state.
            undo = self.__dict__.get("_state_undo")
            if undo is not None:
                undo.append((p, dict(state)))
            del state[_KAHAN_KEY]
        return super()._init_state(group, p)

    def _new_state_tensor(self, group: dict[str, Any], key: str, p: Tensor) -> Tensor:
        dtype, numel, shape = self._state_spec(group, key, p)
        if key in _SCALE_KEYS:  # (8-bit codes 0 with scales 0 read as 0.0: every code times 0)
            zeros = torch.zeros(numel, dtype=dtype, device=p.device)
            if not _is_dtensor(p):
                return zeros
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(zeros, p.device_mesh, self._state_distribution(group, key, p)[1],
                                      run_check=False, shape=shape, stride=(1,))  # fmt: skip
        return _zeros_like(p, dtype)

    def _plan_structure(self, group: dict[str, Any]) -> tuple:
        return (*super()._plan_structure(group), _group_state(group), group.get("stochastic_rounding"))

    def _state_dtype_hint(self, group: dict[str, Any], key: str, t: Tensor) -> str:
        if key not in ("exp_avg", "exp_avg_sq"):
            return ""
        # (a group whose state_dtype was changed by hand: the states are converted by a load, not by a step)
        return (f" (the group's state_dtype is {group.get('state_dtype', 'fp32')!r}; to convert existing states, "
                f"load them again: opt.load_state_dict(opt.state_dict()))")  # fmt: skip

    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        group["betas"] = _check_betas(group["betas"])
        group["state_dtype"] = _state_name(group.get("state_dtype"))
        for key in ("stochastic_rounding", "kahan_summation"):
            if not isinstance(group.get(key, False), bool):
                raise TypeError(f"{key} must be a bool, got {type(group[key]).__name__}")

    def _check_params(self, group_index: int, params: list[Tensor], group: dict[str, Any] | None = None, *,
                      traced: bool = False) -> None:  # fmt: skip
        super()._check_params(group_index, params, group, traced=traced)
        if group is not None and _group_state(group) == "int8":
            for i, p in enumerate(params):
                st = self.state.get(p)
                missing = [k for k in _SCALE_KEYS if st and k not in st]
                if missing:  # (codes without their scales would step as moments of zeros)
                    raise ValueError(
                        f"{type(self).__name__}: the state of param {i} of param group {group_index} has 8-bit "
                        f"moments but no {missing[0]!r} (give it every key, or empty it)"
                    )
                if _is_dtensor(p):
                    _check_scale_layout(p, f"param {i} of param group {group_index}")

    def _lowbit(self, group: dict[str, Any], part: _Part) -> dict[str, Any] | None:
        """The low-bit kernel's options for ``part``, or None when the fp32 Adam kernel does it."""
        state = _group_state(group)
        low_precision_alone = part.params[0].dtype != torch.float32 and not part.masters
        param_sr = bool(group.get("stochastic_rounding")) and low_precision_alone
        kahan = bool(group.get("kahan_summation")) and low_precision_alone
        if state == "fp32" and not param_sr and not kahan:
            return None
        gi = group.index if isinstance(group, _StepGroup) else next(i for i, g in enumerate(self.param_groups)
                                                                     if g is group)  # fmt: skip
        dtype_index = (torch.float32, torch.bfloat16, torch.float16).index(part.params[0].dtype)
        seed = (self._seed + 7919 * gi + 104729 * dtype_index) % 2**31  # (tensor indices restart in each launch)
        r = part.roles
        scales = [_used_scales(r[k], part.params) if k in r else () for k in _SCALE_KEYS]
        return dict(
            exp_avg_scales=scales[0], exp_avg_sq_scales=scales[1],
            master_params=part.masters, kahan_comps=r.get(_KAHAN_KEY, ()) if kahan else (), state=state,
            param_sr=param_sr, seed=seed,
        )  # fmt: skip

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group.setdefault("decoupled_weight_decay", self._default_decoupled)
        if self._default_decoupled:
            group["decoupled_weight_decay"] = True  # (torch.optim.AdamW does the same)

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """torch.optim.Adam's checks and messages, plus: every value must be finite."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if isinstance(lr, Tensor) and not lr.is_floating_point():  # (torch takes an integer one; the kernels read fp)
            raise ValueError(f"Tensor lr must be 1-element and floating-point, got {lr.dtype}")
        lr = _to_float(lr, "lr")
        if not 0.0 <= lr or not _finite_fp32(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        eps = _to_float(group["eps"], "eps")
        if not 0.0 <= eps or not _finite_fp32(eps):
            raise ValueError(f"Invalid epsilon value: {eps}")
        beta1, beta2 = (_to_float(b, ("betas[0]", "betas[1]")[i]) for i, b in enumerate(_check_betas(group["betas"])))
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        wd = _to_float(group["weight_decay"], "weight_decay")
        if not 0.0 <= wd or not _finite_fp32(wd):
            raise ValueError(f"Invalid weight_decay value: {wd}")
        check_backend(group.get("backend", "auto"))
        state = _state_name(group.get("state_dtype"))
        if state != "fp32" and group["amsgrad"]:
            raise ValueError(f"amsgrad needs fp32 states (state_dtype={state!r} was given)")
        if group["amsgrad"] and (group.get("stochastic_rounding") or group.get("kahan_summation")):
            # (those parts run the low-bit kernel, which has no max_exp_avg_sq: amsgrad would be silently dropped)
            raise ValueError("amsgrad is not supported with stochastic_rounding or kahan_summation")
        if group.get("stochastic_rounding") and group.get("kahan_summation"):
            raise ValueError("stochastic_rounding and kahan_summation are two ways to store params without masters: "
                             "pass one")  # fmt: skip
        if (group.get("stochastic_rounding") or group.get("kahan_summation")) and group.get("master_weights"):
            raise ValueError("stochastic_rounding/kahan_summation are for bf16/fp16 params without master weights: "
                             "pass master_weights=False")  # fmt: skip

    @staticmethod
    def _check_step_values(gi: int, group: dict[str, Any]) -> tuple[float, float, float, float]:
        """Check the values a user or scheduler may have changed since the constructor checked them (tensor betas,
        eps or weight decay included); return ``(beta1, beta2, eps, weight_decay)`` as floats."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point() or lr.layout != torch.strided:
                raise ValueError(f"Tensor lr must be 1-element and floating-point (param group {gi})")
        elif not isinstance(lr, numbers.Real):
            raise TypeError(f"lr of param group {gi} must be a number or a 1-element tensor, got {type(lr).__name__}")
        elif not (_finite_fp32(lr) and lr >= 0):  # (a bool is 1 or 0, as torch)
            raise ValueError(f"Invalid learning rate: {lr} (param group {gi})")
        try:
            n_betas = len(group["betas"])
        except TypeError:
            raise TypeError(f"betas of param group {gi} must be a pair of numbers or 1-element tensors, got "
                            f"{type(group['betas']).__name__}") from None  # fmt: skip
        if n_betas != 2:
            raise ValueError(f"betas must be a pair (param group {gi})")
        for i, b in enumerate(group["betas"]):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element (param group {gi})")
        betas = [_to_float(b, ("betas[0]", "betas[1]")[i], gi) for i, b in enumerate(group["betas"])]
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (param group {gi})")
        eps, wd = _to_float(group["eps"], "eps", gi), _to_float(group["weight_decay"], "weight_decay", gi)
        if not (_finite_fp32(eps) and eps >= 0):
            raise ValueError(f"Invalid epsilon value: {eps} (param group {gi})")
        if not (_finite_fp32(wd) and wd >= 0):
            raise ValueError(f"Invalid weight_decay value: {wd} (param group {gi})")
        for key in ("amsgrad", "maximize", "decoupled_weight_decay"):  # (the launch reads each as a bool)
            try:
                bool(group.get(key, False))
            except Exception:  # noqa: BLE001 - (e.g. a numpy array of several elements: torch's truth value error)
                raise TypeError(f"{key} of param group {gi} must be a bool, got {type(group[key]).__name__}") from None
        # The storage options, as the constructor checks them (a group edited since: refused before any change)
        try:
            state = _state_name(group.get("state_dtype"))
        except ValueError as e:
            raise ValueError(f"{e} (param group {gi})") from None
        if state != "fp32" and group["amsgrad"]:
            raise ValueError(f"amsgrad needs fp32 states (state_dtype={state!r}) (param group {gi})")
        sr, kahan = group.get("stochastic_rounding", False), group.get("kahan_summation", False)
        if not isinstance(sr, bool) or not isinstance(kahan, bool):
            raise TypeError(f"stochastic_rounding and kahan_summation must be bools (param group {gi})")
        if sr and kahan:
            raise ValueError(f"stochastic_rounding and kahan_summation: pass one (param group {gi})")
        if group["amsgrad"] and (sr or kahan):
            raise ValueError(f"amsgrad is not supported with stochastic_rounding or kahan_summation (param group {gi})")
        if (sr or kahan) and group.get("master_weights"):
            raise ValueError(f"stochastic_rounding/kahan_summation are for params without master weights "
                             f"(param group {gi})")  # fmt: skip
        return betas[0], betas[1], eps, wd

    def _make_launcher(self, group: dict[str, Any], part: _Part, grads: list[Tensor]) -> Any:
        from ..kernels.adam import AdamStep

        r = part.roles
        lowbit = self._lowbit(group, part)
        if lowbit is not None:
            from ..kernels.adam_lowbit import AdamLowbitStep

            return AdamLowbitStep(part.params, grads, r["exp_avg"], r["exp_avg_sq"], part.steps, **lowbit)
        return AdamStep(part.params, grads, r["exp_avg"], r["exp_avg_sq"], r.get("max_exp_avg_sq", []), part.steps,
                        part.masters, amsgrad=bool(group["amsgrad"]))  # fmt: skip

    def _launch(self, part: _Part, group: dict[str, Any], lr: Any, values: tuple, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, eps, weight_decay = values
        part.launcher._run(
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=bool(group["maximize"]),
            decoupled=bool(group["decoupled_weight_decay"]), grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip

    def _prepare_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                           grad_scale: Tensor | None, found_inf: Tensor | None) -> Callable[[], None]:  # fmt: skip
        """The reference path in two phases (see ``FusedOptimizer._prepare_reference``): the multi-tensor CPU steps'
        ``*_prepare`` compute every new value here; the call returned stores them (step counts last)."""
        from .. import _cpu_lowbit, reference

        beta1, beta2, eps, weight_decay = values
        r = part.roles
        lowbit = self._lowbit(group, part)
        if lowbit is not None:
            store = _cpu_lowbit.adam_lowbit_cpu_(
                part.params, grads, r["exp_avg"], r["exp_avg_sq"], part.steps, **lowbit, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=bool(group["maximize"]),
                decoupled=bool(group["decoupled_weight_decay"]), grad_scale=grad_scale, found_inf=found_inf,
                defer=True,
            )  # fmt: skip
        else:  # (what _ops.adam_eager runs for a backend other than "triton")
            store = reference._adam_cpu_prepare(
                part.params, grads, r["exp_avg"], r["exp_avg_sq"], r.get("max_exp_avg_sq", []), part.steps, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=bool(group["amsgrad"]),
                maximize=bool(group["maximize"]), decoupled=bool(group["decoupled_weight_decay"]), step=None,
                grad_scale=grad_scale, found_inf=found_inf, master_params=part.masters,
            )  # fmt: skip
        return partial(_stored, store, part.params)

    def _run_reference(self, part: _Part, grads: list[Tensor], group: dict[str, Any], lr: Any, values: tuple,
                       grad_scale: Tensor | None, found_inf: Tensor | None) -> None:  # fmt: skip
        beta1, beta2, eps, weight_decay = values
        r = part.roles
        lowbit = self._lowbit(group, part)
        if lowbit is not None:
            from .. import _cpu_lowbit  # the multi-tensor CPU step (the oracle's bits; off the CPU, the oracle)

            _cpu_lowbit.adam_lowbit_cpu_(
                part.params, grads, r["exp_avg"], r["exp_avg_sq"], part.steps, **lowbit, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=bool(group["maximize"]),
                decoupled=bool(group["decoupled_weight_decay"]), grad_scale=grad_scale, found_inf=found_inf,
            )  # fmt: skip
            _ops.bump_versions(part.params)
            return
        lr_tensor = lr if isinstance(lr, Tensor) else None
        _ops.adam_eager(
            part.params, grads, r["exp_avg"], r["exp_avg_sq"], r.get("max_exp_avg_sq", []), part.masters, part.steps,
            0.0 if lr_tensor is not None else float(lr), lr_tensor, beta1, beta2, eps, weight_decay,
            bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]), None, grad_scale,
            found_inf, part.backend,
        )  # fmt: skip

    # -- low-bit states in state dicts -----------------------------------------------------------------------
    def state_dict(self, dequantize: bool | None = None) -> dict[str, Any]:
        """torch.optim's ``state_dict``. Low-bit moments are saved as they are kept (8-bit codes and their
        scales, bf16 moments); the codes under the keys ``exp_avg_codes``/``exp_avg_sq_codes``, so that a loader
        expecting fp32 moments (torch's AdamW; DCP filling an fp32 optimizer's dict, which would cast codes to
        floats) finds no ``exp_avg`` rather than codes; with ``dequantize=True`` every moment is an fp32 tensor
        shaped like its param and the low-bit keys (scales, Kahan buffers; ``state_dtype``... where a group holds
        the constructor's) are left out: torch.optim.AdamW's layout, which torch (and a FusedAdamW with other
        states) loads. What is dequantised is what the state holds (8-bit codes with their scales, bf16 moments),
        whatever its group's ``state_dtype`` says now; codes without their scales raise. ``dequantize=None``: the
        optimizer's ``dequantize_state_dict`` (False unless set). Hooks run as in torch: the pre hooks first, the
        post hooks on the finished dict (a hook that returns a dict replaces it).

        8-bit states of DTensor params (FSDP2, tensor parallel) are saved as DTensors: the codes like the param, the
        scales of each shard's own blocks as :func:`_scale_layout` lays them out, with the layout recorded (key
        ``"int8_layout"``; None for a plain param's); they load only onto that layout (same param shape, mesh shape
        and placements). A dequantized dict loads onto any layout (DCP reshards it) and is quantised there. The dict
        holds the live state tensors, as torch.optim's does (no copy of the states at every checkpoint): DCP's load
        writes into them before ``load_state_dict`` can refuse codes of another layout."""
        sd = self._state_dict_unhooked()
        if not (self.dequantize_state_dict if dequantize is None else dequantize):
            for k, st in sd["state"].items():
                if not (isinstance(st, dict) and _holds_codes(st)):
                    continue
                # (a plain param's codes record that they are no DTensor's: a dict of a DTensor param loaded onto a
                # plain one through DCP or set_optimizer_state_dict finds the key to write its layout to, and is
                # refused by load_state_dict with its message)
                st[_LAYOUT_KEY] = _layout_tag(st["exp_avg"]) if _is_dtensor(st["exp_avg"]) else None
                sd["state"][k] = {_CODES_KEYS.get(key, key) if isinstance(v, Tensor) and v.dtype == torch.uint8
                                  else key: v for key, v in st.items()}  # fmt: skip
            return self._state_dict_post_hooks(sd)
        # By what each state holds, not by its group's state_dtype (which may have been changed since): 8-bit codes
        # are dequantised with their scales, which are dropped then; bf16 moments widened.
        for k, st in sd["state"].items():
            if not isinstance(st, dict):
                continue
            out = dict(st)
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                value = st.get(key)
                if not isinstance(value, Tensor):
                    continue
                if value.dtype == torch.uint8:
                    scales = st.get(f"{key}_scale")
                    if not isinstance(scales, Tensor):
                        raise ValueError(
                            f"state_dict(dequantize=True): the state of param {k} holds 8-bit codes under {key!r} "
                            f"but no {key + '_scale'!r} to dequantise them with (give it every key, or empty it)"
                        )
                    out[key] = _dequantized(value, scales, signed)
                    del out[f"{key}_scale"]
                elif value.is_floating_point() and value.dtype != torch.float32:
                    out[key] = value.to(torch.float32)
            out.pop(_KAHAN_KEY, None)
            sd["state"][k] = out
        # (a group's state_dtype, stochastic_rounding, kahan_summation: left out where they hold the constructor's
        # values, as in the compact dict; one set otherwise, by hand or per group, is kept so that a load of this
        # dict keeps it, rather than taking the constructor's)
        return self._state_dict_post_hooks(sd)

    def _tensor_state_keys(self, groups: list | None = None) -> set[str]:
        return super()._tensor_state_keys(groups) | {"exp_avg", "exp_avg_sq", *_SCALE_KEYS, _KAHAN_KEY}

    def _loaded_key(self, key: Any, value: Any, src: dict[Any, Any], where: str) -> Any:
        """``exp_avg_codes``/``exp_avg_sq_codes`` (8-bit codes, as ``state_dict`` saves them) are kept under
        ``exp_avg``/``exp_avg_sq``; a dict of an earlier version, with the codes under those keys, loads too."""
        for moment, codes_key in _CODES_KEYS.items():
            if key == codes_key:
                if not isinstance(value, Tensor) or value.dtype != torch.uint8:
                    got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"loaded state dict: state {key!r} of {where} must be a uint8 tensor of 8-bit "
                                     f"codes, got {got}")  # fmt: skip
                if moment in src:
                    raise ValueError(f"loaded state dict: the state of {where} has both {moment!r} and {key!r}")
                return moment
        return key

    def _load_as_is(self, key: str, value: Any) -> bool:
        return isinstance(value, Tensor) and (key in _SCALE_KEYS or key == _KAHAN_KEY
                                              or (value.dtype == torch.uint8 and key in _CODES_KEYS))  # fmt: skip

    def _load_state_value(self, key: str, value: Tensor, p: Tensor, where: str) -> Tensor | None:
        """8-bit codes (uint8, the param's element count), block scales (fp32, ceil(numel / 256); for a DTensor
        param, laid out as :func:`_scale_layout` says) and Kahan buffers (the param's dtype and count): copied as
        they are, to the param's device (DTensor params: as DTensors, a full tensor sharded as the param is). None
        for a Kahan buffer of the param's other low-precision dtype (:func:`_stale_kahan`), which is left out."""
        if key in _SCALE_KEYS:
            if _is_dtensor(p):
                placements, count, shape = _scale_layout(p)
                from torch.distributed.tensor import DTensor, distribute_tensor

                if _off_mesh(p) and value.numel() == 0:  # (this rank holds no shard, so no scales: empty, as given)
                    local = torch.empty(0, dtype=torch.float32, device=p._local_tensor.device)
                    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape,
                                              stride=(1,))  # fmt: skip
                if _is_dtensor(value) and _same_ranks(value.device_mesh, p.device_mesh):
                    value = _on_mesh(value, p.device_mesh)  # (a mesh equal but for its dim names: no communication)
                laid_out = (_is_dtensor(value) and value.device_mesh == p.device_mesh
                            and tuple(value.placements) == placements)  # fmt: skip
                if value.dtype != torch.float32 or value.shape != shape or not (laid_out or not _is_dtensor(value)):
                    raise ValueError(
                        f"loaded state dict: state {key!r} of {where} must be fp32 block scales of shape "
                        f"{tuple(shape)} (placements {placements} on the param's mesh), got {value.dtype} of shape "
                        f"{tuple(value.shape)}{f' placed {tuple(value.placements)}' if _is_dtensor(value) else ''}: "
                        "saved on another layout? Save with state_dict(dequantize=True) to reshard"
                    )
                if not _is_dtensor(value):
                    cut = distribute_tensor(
                        value.detach().to(p.device), p.device_mesh, placements, src_data_rank=None
                    )  # (this rank's shard, cut locally: no communication)
                    local = cut._local_tensor.clone(memory_format=torch.contiguous_format)  # (memory of its own)
                    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape,
                                              stride=(1,))  # fmt: skip
                local = value._local_tensor.detach().to(p.device, copy=True, memory_format=torch.contiguous_format)
                return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape, stride=(1,))
            if _is_dtensor(value):
                raise ValueError(f"loaded state dict: state {key!r} of {where} holds the block scales of a DTensor "
                                 "param's shards; this param is a plain tensor. Save with state_dict(dequantize=True) "
                                 "to load 8-bit states onto another layout")  # fmt: skip
            if value.dtype != torch.float32 or value.layout != torch.strided:
                raise ValueError(_scales_count_message(key, where, p, value))
            # (their count is checked with the layout the dict records, in _convert_loaded_state: the scales of a
            # DTensor param's shards are refused as such, not for their count)
            return value.detach().to(p.device, copy=True).contiguous().reshape(-1)
        if key == _KAHAN_KEY and _stale_kahan({key: value}, p):
            return None  # (a buffer of the param's old dtype: left out, see _convert_loaded_state)
        dtype = p.dtype if key == _KAHAN_KEY else torch.uint8
        if (
            value.dtype != dtype
            or value.numel() not in (p.numel(), *((0,) if _off_mesh(p) else ()))
            or value.layout != torch.strided
        ):  # fmt: skip  (a rank off the param's mesh may be given nothing)
            raise ValueError(f"loaded state dict: state {key!r} of {where} must be a dense {dtype} tensor of "
                             f"{p.numel()} elements, got {value.dtype} with {value.numel()}")  # fmt: skip
        _check_state_shape(key, value, p, where)
        return self._load_state_tensor(value, p, dtype)

    def _convert_loaded_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any], where: str) -> dict:
        """Moments as ``group`` keeps them: fp32 ones quantised (8-bit) or rounded (bf16), 8-bit ones dequantised
        for fp32/bf16 states; a Kahan buffer kept only where the group uses one. 8-bit states of DTensor params
        must come from the same layout (``int8_layout``)."""
        state = _group_state(group)
        st = dict(st)
        if _KAHAN_KEY in st and st[_KAHAN_KEY] is None:  # (stale: see _load_state_value)
            del st[_KAHAN_KEY]
        tag = st.pop(_LAYOUT_KEY, None)
        coded = [k for k in ("exp_avg", "exp_avg_sq") if isinstance(st.get(k), Tensor) and st[k].dtype == torch.uint8]
        stray = [k for k in _SCALE_KEYS if k in st and k.removesuffix("_scale") not in coded]
        if stray:  # (codes cast to float would load as moments of 0..255, their scales dropped)
            raise ValueError(f"loaded state dict: {where} has {stray[0]!r} but {stray[0].removesuffix('_scale')!r} is "
                             "not 8-bit codes (uint8): block scales come only with codes")  # fmt: skip
        if coded:
            missing = [f"{k}_scale" for k in coded if f"{k}_scale" not in st]
            if missing or len(coded) != 2:
                raise ValueError(f"loaded state dict: the 8-bit moments of {where} need both codes and both scales "
                                 f"(missing {missing or 'a moment'})")  # fmt: skip
            here = _layout_tag(p) if _is_dtensor(p) else None
            if tag != here:
                raise ValueError(
                    f"loaded state dict: the 8-bit states of {where} were saved "
                    f"{f'on DTensor shards ({tag})' if tag else 'for a plain tensor'}, but the param is "
                    f"{f'a DTensor ({here})' if here else 'a plain tensor'}: each shard has its own blocks, so they "
                    "load only onto the layout they were saved on. Save with state_dict(dequantize=True) (or set "
                    "dequantize_state_dict = True on the optimizer, for DCP) to reshard"
                )
            for key in _SCALE_KEYS if here is None else ():  # (a DTensor param's: checked as they were loaded)
                if st[key].numel() != n_scales(p.numel()):
                    raise ValueError(_scales_count_message(key, where, p, st[key]))
            if state != "int8":
                for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                    st[key] = _dequantized(st[key], st.pop(f"{key}_scale"), signed)
        elif state == "int8":
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if key in st:
                    st[key], st[f"{key}_scale"] = _quantized(st[key], p, signed)
        for key in _SCALE_KEYS:
            if state != "int8":
                st.pop(key, None)
        if state == "bf16" or (state == "fp32" and not coded):
            dtype = _STATE_TORCH_DTYPES[state]
            for key in ("exp_avg", "exp_avg_sq"):
                if isinstance(st.get(key), Tensor) and st[key].dtype != dtype:
                    st[key] = st[key].to(dtype)
        elif state == "fp32":
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = st[key].to(torch.float32)
        if not self._keeps(group, _KAHAN_KEY, p):  # (the load skips such a buffer: this is for a subclass's)
            st.pop(_KAHAN_KEY, None)
        return st

    def _step_traced(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _adam_calls(*self._traced_calls(read=(grad_scale, found_inf)), grad_scale, found_inf)

    def _traced_group_calls(self, gi: int, group: dict[str, Any]) -> list[tuple]:
        """One call per part, as the eager plan splits the group: ``fused_ops::adam_`` (fp32 moments, fp32 params or
        masters) or ``fused_ops::adam_lowbit_`` (low-bit moments, stochastic rounding, Kahan)."""
        values = self._check_step_values(gi, group)
        flags = (bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"]))
        calls = []
        for part in self._traced_parts(gi, group):
            r = part.roles
            lowbit = self._lowbit(group, part)
            if lowbit is None:
                states = (r["exp_avg"], r["exp_avg_sq"], r["max_exp_avg_sq"] if group["amsgrad"] else None)
                calls.append((None, part.params, part.launcher, states, part.steps, part.masters, group["lr"],
                              values, flags, part.device, part.backend))  # fmt: skip
            else:
                lowbit = {k: list(v) if isinstance(v, list | tuple) else v for k, v in lowbit.items()}
                calls.append((lowbit, part.params, part.launcher, (r["exp_avg"], r["exp_avg_sq"]), part.steps,
                              part.masters, group["lr"], values, flags, part.device, part.backend))  # fmt: skip
        return calls


def _adam_calls(calls: list[tuple], staged: list, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The custom-op calls of a traced step (one per part), in a frame of their own that Dynamo captures (see
    ``fused_ops.optim.sgd._sgd_calls``)."""
    for lowbit, params, grads, states, steps, masters, lr, values, flags, device, backend in calls:
        beta1, beta2, eps, weight_decay = values
        amsgrad, maximize, decoupled = flags
        lr_tensor = (lr if lr.device == device else lr.to(device)) if isinstance(lr, Tensor) else None
        scale = None if grad_scale is None else torch.as_tensor(grad_scale, dtype=torch.float32,
                                                                device=device).reshape(1)  # fmt: skip
        inf = None if found_inf is None else found_inf.to(device)
        if lowbit is None:
            functional.adam_(
                params, grads, states[0], states[1], states[2], steps, lr=lr if lr_tensor is None else lr_tensor,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                decoupled_weight_decay=decoupled, grad_scale=scale, found_inf=inf, master_params=masters or None,
                backend=backend,
            )  # fmt: skip
            continue
        _ops.adam_lowbit_(
            params, grads, states[0], states[1], steps, lowbit["exp_avg_scales"], lowbit["exp_avg_sq_scales"],
            lowbit["master_params"], lowbit["kahan_comps"], lowbit["state"], lowbit["param_sr"], lowbit["seed"],
            0.0 if lr_tensor is not None else float(lr), lr_tensor, beta1, beta2, eps, weight_decay, maximize,
            decoupled, scale, inf, backend,
        )  # fmt: skip
    _write_back(staged)


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default ``weight_decay=1e-2``), fused; drop-in torch.optim.AdamW.

    The arguments are :class:`FusedAdam`'s (see there: ``master_weights``, ``state_dtype`` ("int8", "bfloat16"),
    ``stochastic_rounding``, ``kahan_summation``, ``seed``, ``backend``), with ``decoupled_weight_decay`` always
    True and torch.optim.AdamW's defaults.
    """

    _default_decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
        state_dtype: str | torch.dtype | None = None,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, backend=backend, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation, seed=seed,
        )  # fmt: skip
