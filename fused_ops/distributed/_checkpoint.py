"""Checkpoints in ZeroAdamW's own formats: this rank's shard (``state_dict``), torch.optim.AdamW's layout
(``consolidated_state_dict``), and loading either (or the list of all ranks' shards) with any world size."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._ref_lowbit import QUANT_BLOCK, dequantize_blockwise, n_scales, quantize_blockwise_unclipped
from .._validate import loaded_tensor_problem
from ._agree import _check_group, _check_lowbit_amsgrad, _check_state_step, _check_state_tensor
from ._comm import _all_gather
from ._layout import _Bucket, _Segment

_FORMAT = "fused_ops.zero/1"
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MASTER_KEY = "master_param"
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # which 8-bit map each moment's codes index
_SCALE_SUFFIX = "_scale"  # 8-bit codes under "exp_avg_codes" come with their block scales under "exp_avg_scale"
# 8-bit codes are saved under "exp_avg_codes" / "exp_avg_sq_codes", never under "exp_avg" / "exp_avg_sq": a loader
# whose template expects fp32 moments there (DCP into an fp32 optimizer, torch.optim.AdamW) finds them missing and
# refuses, instead of casting the codes to floats. (Loading also accepts codes under "exp_avg", the old form.)
_CODES_SUFFIX = "_codes"


def _codes_as_moments(st: dict, i: int) -> dict:
    """A param's saved state with its 8-bit codes (``exp_avg_codes``) under the moment's key (``exp_avg``), as the
    loaders read them; ``st`` itself when it has none."""
    if not any(k + _CODES_SUFFIX in st for k in _SIGNED):
        return st
    st = dict(st)
    for key in _SIGNED:
        ckey = key + _CODES_SUFFIX
        if ckey not in st:
            continue
        if key in st:
            raise ValueError(f"the state of param {i} has both {key!r} and {ckey!r} (8-bit codes): one or the other")
        codes = st.pop(ckey)
        if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
            raise ValueError(f"state {ckey!r} of param {i} must be a uint8 tensor of 8-bit codes, got {_what(codes)}")
        st[key] = codes
    return st


def _saved_name(name: str, t: Tensor) -> str:
    """The key a state tensor is saved under: 8-bit codes under ``exp_avg_codes`` / ``exp_avg_sq_codes``."""
    return name + _CODES_SUFFIX if t.dtype == torch.uint8 else name


@dataclass
class _Codes:
    """8-bit moments of a range of a param that starts on one of its 256-element blocks: uint8 codes and the fp32
    scales of the ceil(n / 256) blocks they cover."""

    codes: Tensor
    scales: Tensor

    def values(self, signed: bool) -> Tensor:
        return dequantize_blockwise(self.codes.reshape(-1), self.scales.reshape(-1), signed)


def _check_moment_shape(st: dict, i: int, key: str, shape: torch.Size) -> None:
    """``st[key]`` (of the param's element count, checked) has the param's shape, or either is flat, as FusedAdamW
    loads them: another shape of two or more dims (a transposed weight's moments) would pair its elements with the
    wrong ones of the param (probe 87)."""
    t = st.get(key)
    if isinstance(t, Tensor) and t.dim() != 1 and len(shape) != 1 and tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"state {key!r} of param {i} has shape {tuple(t.shape)} but the param has shape {tuple(shape)} (a state "
            "pairs with the param's elements in their logical order: the same element count in another shape would "
            "pair them with the wrong ones; a flat state loads)"
        )


def _check_moment(st: dict, i: int, key: str, numel: int, expected: str, lo: int = 0) -> None:
    """``st[key]``: a floating-point tensor of ``numel`` elements, or (exp_avg, exp_avg_sq) uint8 codes of ``numel``
    elements with ``st[key + "_scale"]``, fp32 block scales of ceil(numel / 256) elements, for a range starting at
    element ``lo`` of the param, which must be a multiple of 256 (a block boundary)."""
    t = st.get(key)
    if key not in _SIGNED or not (isinstance(t, Tensor) and t.dtype == torch.uint8):
        _check_state_tensor(st, i, key, numel, expected)
        return
    where = f"state {key!r} of param {i}"
    if t.layout != torch.strided or t.is_meta:
        raise ValueError(f"{where} must be a dense tensor with data, got {t.layout} on {t.device}")
    if t.numel() != numel:
        raise ValueError(f"{where} has {t.numel()} elements but {expected}")
    if lo % QUANT_BLOCK:
        raise ValueError(f"{where} holds 8-bit codes of a range starting at element {lo}, not on a {QUANT_BLOCK}-"
                         "element block")  # fmt: skip
    skey = key + _SCALE_SUFFIX
    if skey not in st:
        raise ValueError(f"{where} holds 8-bit codes (uint8) but the state has no {skey!r} (their block scales)")
    scales = st[skey]
    if not isinstance(scales, Tensor) or scales.layout != torch.strided or scales.is_meta:
        raise ValueError(f"state {skey!r} of param {i} must be a dense tensor with data, got {_what(scales)}")
    if scales.dtype != torch.float32:
        raise ValueError(f"state {skey!r} of param {i} must be float32 block scales, got {scales.dtype}")
    if scales.numel() != n_scales(numel):
        raise ValueError(f"state {skey!r} of param {i} has {scales.numel()} block scales but {numel} codes need "
                         f"ceil({numel} / {QUANT_BLOCK}) = {n_scales(numel)}")  # fmt: skip


def _check_memory_of_checkpoint(state_dict: Any) -> None:
    """Every tensor of a checkpoint (its states, a DTensor's local shard, a tensor lr) that is dense and has data lies
    inside its storage: the checks and the load read them with torch's ops, which do not check (a storage freed in
    place crashed the rank; one shrunk was read past its end). Raises a ValueError naming it; run before anything
    reads a value, inside the load's agreed checks."""
    dicts = list(state_dict) if isinstance(state_dict, (list, tuple)) else [state_dict]
    for k, sd in enumerate(dicts):
        if not isinstance(sd, dict):
            continue  # (the load's own checks name it)
        shard = f" of state dict {k} of the list" if len(dicts) > 1 else ""
        entries: list[tuple[str, Any]] = []
        state = sd.get("state")
        if isinstance(state, dict):
            for pid, st in state.items():
                if isinstance(st, dict):
                    entries += [(f"state {key!r} of param {pid!r}{shard}", v) for key, v in st.items()]
                else:
                    entries.append((f"the state of param {pid!r}{shard}", st))
        groups = sd.get("param_groups")
        if isinstance(groups, (list, tuple)):
            for gi, g in enumerate(groups):
                if isinstance(g, dict):
                    entries += [(f"{key!r} of param group {gi}{shard}", v) for key, v in g.items() if key != "params"]
        for where, v in entries:
            problem = loaded_tensor_problem(v) if isinstance(v, Tensor) else None
            if problem is not None and "storage" in problem:  # (layouts and meta: the checks below name them)
                raise ValueError(f"{where} {problem}")


def _what(x: Any) -> str:
    return f"a {x.layout} tensor on {x.device}" if isinstance(x, Tensor) else f"a {type(x).__name__}"


def _range_of(st: dict, key: str, base: int, lo: int, hi: int, device: torch.device) -> Tensor | _Codes:
    """Elements [lo, hi) of the param from ``st[key]``, which holds elements [base, ...) of it: a ``_Codes`` when
    the range starts on a block of the saved codes and ends on one (or where they end), else fp32 values."""
    t = st[key].detach().reshape(-1)
    if t.dtype != torch.uint8:
        return t[lo - base : hi - base].to(device, torch.float32)
    scales = st[key + _SCALE_SUFFIX].detach().reshape(-1)
    first = (lo - base) // QUANT_BLOCK
    if (lo - base) % QUANT_BLOCK == 0 and ((hi - base) % QUANT_BLOCK == 0 or hi - base == t.numel()):
        return _Codes(t[lo - base : hi - base].to(device), scales[first : first + n_scales(hi - lo)].to(device))
    last = -(-(hi - base) // QUANT_BLOCK)
    values = dequantize_blockwise(t[first * QUANT_BLOCK : min(last * QUANT_BLOCK, t.numel())], scales[first:last],
                                  _SIGNED[key])  # fmt: skip
    return values[lo - base - first * QUANT_BLOCK : hi - base - first * QUANT_BLOCK].to(device)


@dataclass
class _LoadPlan:
    """What loading a checked checkpoint sets (made by ``_plan_load`` or ``_plan_dcp_load``; changes nothing)."""

    groups: list[dict]  # each group's values, without "params"
    steps: list[float]  # each param's step count
    # fetch(param, key, lo, hi): elements [lo, hi) of the param's flattened state as fp32 on this device (lo, hi:
    # the range this rank owns), None when the param has no such state.
    fetch: Callable[[int, str, int, int], Tensor | None]
    summary: tuple  # (groups, steps, [(what, description), ...]): compared between ranks (see _agree_on_load)
    prepare: Callable[[_Bucket], None] | None = None  # per bucket, on every rank, before its fetches (collectives)


class _CheckpointMixin:
    """``state_dict``, ``consolidated_state_dict`` and ``load_state_dict``.

    The hooks of ``torch.optim.Optimizer`` run as torch runs them: ``register_state_dict_pre_hook``'s
    ``hook(optimizer)`` before ``state_dict()``, ``consolidated_state_dict()`` and ``dcp_state_dict()`` build their
    dict, ``register_state_dict_post_hook``'s ``hook(optimizer, state_dict)`` (which may return a new dict) on the
    dict they return (``consolidated_state_dict``: on the rank(s) that get it); ``register_load_state_dict_pre_hook``'s
    ``hook(optimizer, state_dict)`` (may return a new dict) on a shallow copy of what ``load_state_dict()`` or
    ``load_dcp_state_dict()`` is given, before it is checked (every rank runs its own hooks; the ranks agree on the
    dicts they return), ``register_load_state_dict_post_hook``'s ``hook(optimizer)`` once it is loaded. In the
    collective methods a pre-hook that raises on any rank raises on every rank (its own exception where it raised,
    the agreed ValueError elsewhere) before any collective of the method, with nothing changed.
    """

    def _state_dict_pre_hooks(self) -> None:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)

    def _state_dict_post_hooks(self, state_dict: Any) -> Any:
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _load_pre_hooks(self, state_dict: Any) -> Any:
        hooks = self._optimizer_load_state_dict_pre_hooks
        if not hooks:
            return state_dict
        if isinstance(state_dict, dict):  # (a shallow copy, as torch's: a hook may change its keys)
            state_dict = state_dict.copy()
        elif isinstance(state_dict, (list, tuple)):
            state_dict = list(state_dict)
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _agree_hooks(self, error: str | None, hook_error: Exception | None, what: str, same: Any = None) -> None:
        """``_raise_if_any_rank_failed``, raising a pre-hook's own exception on the rank where it raised."""
        try:
            self._raise_if_any_rank_failed(error, what, same=same)
        except ValueError:
            if hook_error is not None:
                raise hook_error  # noqa: B904 - the agreed error is its context
            raise

    def _groups_for_save(self) -> list[dict[str, Any]]:
        groups, start = [], 0
        for g in self.param_groups:
            # (this package's own key, left out at its default as FusedAdamW leaves out its own: a template for
            # a torch.optim checkpoint, which lacks it, must not ask DCP for it)
            own_default = ("backend", self.defaults["backend"])
            saved = {k: v for k, v in g.items() if k != "params" and (k, v) != own_default}
            saved["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(saved)
        return groups

    def _state_names(self, b: _Bucket) -> list[str]:
        names = ["exp_avg", "exp_avg_sq"]
        if b.max_exp_avg_sq is not None:
            names.append("max_exp_avg_sq")
        if b.master is not None:
            names.append(_MASTER_KEY)
        return names

    @staticmethod
    def _bucket_tensor(b: _Bucket, name: str) -> Tensor:
        return b.master if name == _MASTER_KEY else getattr(b, name)

    def _fp32_shard(self, b: _Bucket, name: str) -> Tensor:
        """State ``name`` of this rank's shard of ``b`` as fp32 values (bf16 widened, 8-bit codes dequantised: the
        shard's blocks are whole blocks of its params, and padding reads 0)."""
        t = self._bucket_tensor(b, name)
        if t.dtype == torch.uint8:
            return dequantize_blockwise(t, getattr(b, name + _SCALE_SUFFIX), _SIGNED[name])
        return t.float()

    def _write_moment(self, b: _Bucket, name: str, seg: _Segment, src: Tensor | _Codes | None) -> None:
        """Set moment ``name`` of segment ``seg`` from a checkpoint's values or codes (None: zeros). Kept as fp32,
        bf16 (rounded to nearest even) or 8-bit codes (fp32 values quantised block by block, codes copied)."""
        n = seg.hi - seg.lo
        view = getattr(b, name).narrow(0, seg.start, n)
        if view.dtype != torch.uint8:
            if isinstance(src, _Codes):
                src = src.values(_SIGNED[name])
            view.zero_() if src is None else view.copy_(src)
            return
        scales = getattr(b, name + _SCALE_SUFFIX).narrow(0, seg.start // QUANT_BLOCK, n_scales(n))
        if src is None:
            view.zero_()
            scales.zero_()
            return
        if not isinstance(src, _Codes):
            src = _Codes(*quantize_blockwise_unclipped(src.reshape(-1), _SIGNED[name]))  # (clips nothing: a saved
            # dequantized dict loads back as its codes and scales)
        view.copy_(src.codes.reshape(-1))
        scales.copy_(src.scales.reshape(-1))

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the state (tensors are copies; save one file per rank).

        ``state[i]`` holds param ``i``'s ``step`` and, for the elements ``ranges[i] = (lo, hi)`` of the
        flattened param that this rank owns, 1-D ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``,
        ``master_param``). ``load_state_dict`` accepts the list of all ranks' dicts, with any world size.
        Runs the state-dict hooks (see the class docstring).
        """
        self._state_dict_pre_hooks()
        self._drain()
        state: dict[int, dict[str, Tensor]] = {i: {"step": t.clone()} for i, t in enumerate(self._steps)}
        ranges: dict[int, tuple[int, int]] = {}
        for seg in self._segment_of.values():
            b, n = seg.bucket, seg.hi - seg.lo
            for name in self._state_names(b):
                t = self._bucket_tensor(b, name)
                state[seg.index][_saved_name(name, t)] = t.narrow(0, seg.start, n).clone()
                scales = getattr(b, name + _SCALE_SUFFIX, None)
                if scales is not None:
                    first = seg.start // QUANT_BLOCK
                    state[seg.index][name + _SCALE_SUFFIX] = scales.narrow(0, first, n_scales(n)).clone()
            ranges[seg.index] = (seg.lo, seg.hi)
        meta = {
            "format": _FORMAT, "rank": self.rank, "world_size": self.world_size, "stage": self.stage,
            "numels": [p.numel() for p in self._params], "shapes": [tuple(p.shape) for p in self._params],
            "ranges": ranges, "state_dtype": self.state_dtype,
        }  # fmt: skip
        return self._state_dict_post_hooks({"state": state, "param_groups": self._groups_for_save(), "zero": meta})

    def consolidated_state_dict(self, to: int | None = 0, device: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The whole state in torch.optim.AdamW's layout, assembled on rank ``to`` (every rank if None).

        Collective: call it on every rank. Other ranks get None. Tensors are put on ``device`` (CPU by default,
        so the full state never has to fit on one GPU); the transient cost on each rank is one bucket.
        Master weights, when kept, are under the extra key ``master_param`` (torch.optim ignores it). The
        state-dict pre-hooks run on every rank, the post-hooks where the dict is returned (see the class docstring).
        """
        error, hook_error = None, None
        try:  # checked on every rank and agreed on before the first gather: no rank fails alone half-way
            if to is not None and not (isinstance(to, int) and 0 <= to < self.world_size):
                raise ValueError(f"to must be a rank in [0, {self.world_size}) or None, got {to!r}")
            torch.empty(0, device=device)  # a device that does not exist (or a bad name) fails here
            try:
                self._state_dict_pre_hooks()
            except Exception as e:
                hook_error = e
                raise
        except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised on every rank
            error = f"{type(e).__name__}: {e}"
            if hook_error is not None:
                error = f"a state_dict pre-hook raised {error}"
        self._agree_hooks(error, hook_error, "consolidated_state_dict", same=("to", to))
        self._drain()
        keep = to is None or to == self.rank
        state: dict[int, dict[str, Tensor]] = {}
        if keep:
            for i, t in enumerate(self._steps):
                state[i] = {"step": t.detach().to(device, copy=True)}
        for b in self._buckets:
            for name in self._state_names(b):
                full = torch.empty(b.numel, dtype=torch.float32, device=self._device)
                _all_gather(full, self._fp32_shard(b, name), self.process_group, async_op=False)
                if keep:
                    for s in b.slots:
                        part = full.narrow(0, s.offset, s.numel).view(s.param.shape)
                        state[s.index][name] = part.to(device, copy=True)
        if not keep:
            return None
        return self._state_dict_post_hooks({"state": state, "param_groups": self._groups_for_save()})

    def load_state_dict(self, state_dict: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Load a checkpoint saved with any world size. Collective: call it on every rank.

        Accepts a torch.optim.AdamW / FusedAdamW / ``consolidated_state_dict`` dict, one rank's
        ``state_dict()`` (enough when the world size and rank are the same), or the list of every rank's
        ``state_dict()`` (resharded here). Each rank copies out only the elements it owns. Load the model's
        params first: master weights that do not round to the current params are replaced by the params (with a
        warning).

        Every rank checks the whole checkpoint before changing anything: group count and sizes, each group's
        hyper-parameters, every param's state (none at all: a param never stepped, zeros; else ``step``, a
        finite count >= 0, and ``exp_avg``, ``exp_avg_sq``, with amsgrad ``max_exp_avg_sq``, floating-point
        tensors of the param's size, or of the shard range's size in a shard list) and, for a shard list, each
        shard's ranges, step counts agreeing between shards, and that the elements this rank owns are covered.
        The ranks then agree (one collective) that every rank's checkpoint is valid and gives the same
        hyper-parameters and step counts; otherwise every rank raises the same ValueError (naming the rank, the
        param index and the key) and nothing is loaded on any rank. Keys missing from a legacy checkpoint's groups
        take torch.optim's defaults (``amsgrad``, ``maximize``: False), as torch.optim loads them.

        A ``dcp_state_dict()`` that ``torch.distributed.checkpoint.load`` filled is loaded as
        ``load_dcp_state_dict`` does (with the param indices as keys).

        The load pre-hooks run first on every rank, on a shallow copy of ``state_dict`` (what they return is what
        is checked and loaded), the load post-hooks after the load (see the class docstring).
        """
        self._load(state_dict, "load_state_dict")

    def _load(self, state_dict: Any, what: str, dcp: bool = False, names: Any = None) -> None:
        """Check (``_plan_load``, or ``_plan_dcp_load`` for a state dict of DTensors), agree, then load."""
        self._drain()
        if self._gather_pending:  # (the last step's all-gather failed on every rank: completed first, as step() does;
            # the load then starts from params that agree between ranks, and the next step() steps)
            self._gather_params()
        error, plan, hook_error = None, None, None
        try:
            try:
                state_dict = self._load_pre_hooks(state_dict)
            except Exception as e:
                hook_error = e
                raise
            _check_memory_of_checkpoint(state_dict)
            if dcp or self._is_dcp_state_dict(state_dict):
                plan = self._plan_dcp_load(state_dict, names)
            else:
                plan = self._plan_load(state_dict)
        except Exception as e:  # noqa: BLE001 - any problem is agreed on with the other ranks, then raised
            error = f"{type(e).__name__}: {e}"
            if hook_error is not None:
                error = f"a load_state_dict pre-hook raised {error}"
        try:
            self._agree_on_load(error, None if plan is None else plan.summary, what)
        except ValueError:
            if hook_error is not None:  # (its own exception on the rank where it raised, the agreed one elsewhere)
                raise hook_error  # noqa: B904 - the agreed error is its context
            raise
        assert plan is not None
        self._apply_load(plan, what)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _apply_load(self, plan: _LoadPlan, what: str) -> None:
        """Set what a checked, agreed plan says: groups, step counts, then bucket by bucket the moments and
        master weights of the segments this rank owns (``plan.prepare`` first, on every rank: its collectives)."""
        for g, ng in zip(self.param_groups, plan.groups, strict=True):
            for k, v in ng.items():
                g[k] = v
        for b in self._buckets:  # no amsgrad any more: no max_exp_avg_sq (as torch.optim's state)
            if b.max_exp_avg_sq is not None and not self.param_groups[b.group]["amsgrad"]:
                b.max_exp_avg_sq = None
                self._adam_view_cache.clear()
        self._ensure_amsgrad_buffers()
        for i, s in enumerate(plan.steps):
            self._steps[i].fill_(s)
        fetch = plan.fetch
        segments: dict[int, list] = {}
        for seg in self._segment_of.values():
            segments.setdefault(seg.bucket.index, []).append(seg)
        stale_master = False
        with torch.no_grad():
            for bucket in self._buckets:
                if plan.prepare is not None:
                    plan.prepare(bucket)
                for seg in segments.get(bucket.index, ()):
                    b, n = seg.bucket, seg.hi - seg.lo
                    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        if getattr(b, name) is not None:  # src None: a param without state (never stepped)
                            self._write_moment(b, name, seg, fetch(seg.index, name, seg.lo, seg.hi))
                    if b.master is not None:
                        current = b.param_shard.narrow(0, seg.start, n)
                        src = fetch(seg.index, _MASTER_KEY, seg.lo, seg.hi)
                        if src is not None and not torch.equal(src.to(device=current.device, dtype=b.dtype), current):
                            stale_master, src = True, None
                        b.master.narrow(0, seg.start, n).copy_(current if src is None else src)
        # (the masters loaded, or the params where the checkpoint's masters do not round to them, are the truth now;
        # a write into the params after this load moves their versions again, see _refreshed_masters)
        self._param_versions = [p._version for p in self._params]
        if stale_master:
            warnings.warn(
                f"ZeroAdamW.{what}: the checkpoint's master weights do not round to the current params; "
                "using the params instead (load the model's state before the optimizer's)",
                stacklevel=4,
            )

    def _check_groups(self, groups: Any) -> tuple[list[dict], list[tuple]]:
        """The checkpoint's param groups, checked against this optimizer's: each group's values to set (without
        ``params``) and the values the ranks compare."""
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"the checkpoint's param_groups is a {type(groups).__name__}, not a list")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        new_groups, summary_groups = [], []
        for gi, (g, sg) in enumerate(zip(self.param_groups, groups, strict=True)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
                raise ValueError(f"param group {gi} of the checkpoint is not a dict with a 'params' list")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi} of the checkpoint has {len(sg['params'])} params, this optimizer's has "
                    f"{len(g['params'])}"
                )
            merged = {k: v for k, v in g.items() if k != "params"}
            merged.update(amsgrad=False, maximize=False)  # torch.optim's defaults for legacy checkpoints
            # (copies, as torch.optim's load deep-copies the groups: the caller's tensor lr is not aliased)
            merged.update({k: copy.deepcopy(v) for k, v in sg.items() if k != "params"})
            if merged.get("differentiable"):
                raise ValueError(f"param group {gi} of the checkpoint has differentiable=True (not supported)")
            lr, beta1, beta2, eps, weight_decay = _check_group(gi, merged, read_lr=True)
            merged["betas"] = (beta1, beta2)
            merged["amsgrad"], merged["maximize"] = bool(merged["amsgrad"]), bool(merged["maximize"])
            _check_lowbit_amsgrad(gi, merged, self.state_dtype)
            new_groups.append(merged)
            lr_value = float(lr.item()) if isinstance(lr, Tensor) else lr
            summary_groups.append((lr_value, beta1, beta2, eps, weight_decay, merged["amsgrad"], merged["maximize"]))
        return new_groups, summary_groups

    def _plan_load(self, state_dict: Any) -> _LoadPlan:
        """Check the whole checkpoint (raising the first problem) and return what loading it sets (see
        ``_LoadPlan``). Changes nothing."""
        numels = [p.numel() for p in self._params]
        n = len(numels)
        if isinstance(state_dict, (list, tuple)):
            shards = list(state_dict)
            if not shards:
                raise ValueError("got an empty list of state dicts")
            for k, sd in enumerate(shards):
                if not isinstance(sd, dict):
                    raise TypeError(f"state dict {k} of the list is a {type(sd).__name__}, not a dict")
        elif isinstance(state_dict, dict) and "zero" in state_dict:
            shards = [state_dict]
        elif isinstance(state_dict, dict):
            shards = None
        else:
            raise TypeError(f"expected a state dict or a list of them, got {type(state_dict).__name__}")

        base = shards[0] if shards else state_dict
        if not isinstance(base.get("state"), dict) or not isinstance(base.get("param_groups"), (list, tuple)):
            raise ValueError("not an optimizer state dict (needs a 'state' dict and a 'param_groups' list)")
        groups = base["param_groups"]
        new_groups, summary_groups = self._check_groups(groups)
        amsgrad = [new_groups[gi]["amsgrad"] for gi in self._group_of]

        def required(i: int) -> tuple[str, ...]:
            return _MOMENT_KEYS if amsgrad[i] else _MOMENT_KEYS[:2]

        if shards is None:
            saved_ids = [pid for g in groups for pid in g["params"]]
            index_of = {pid: i for i, pid in enumerate(saved_ids)}
            if len(index_of) != len(saved_ids):
                raise ValueError("the checkpoint's param groups list a param id more than once")
            by_index: dict[int, dict] = {}
            for pid, st in base["state"].items():
                if pid not in index_of:
                    raise ValueError(f"the checkpoint has state for param id {pid!r}, which no param group lists")
                i = index_of[pid]
                if not isinstance(st, dict):
                    raise ValueError(f"the state of param {i} is a {type(st).__name__}, not a dict")
                if not st:  # no state: a param never stepped
                    continue
                st = _codes_as_moments(st, i)
                shape = f"the param has {numels[i]} (shape {tuple(self._params[i].shape)})"
                for key in required(i):
                    _check_moment(st, i, key, numels[i], shape)
                    _check_moment_shape(st, i, key, self._params[i].shape)
                for key in (*_MOMENT_KEYS[len(required(i)) :], _MASTER_KEY):
                    if key in st:
                        _check_moment(st, i, key, numels[i], shape)
                        _check_moment_shape(st, i, key, self._params[i].shape)
                by_index[i] = st
            steps = [_check_state_step(by_index[i], i) if i in by_index else 0.0 for i in range(n)]

            def fetch(i: int, name: str, lo: int, hi: int) -> Tensor | _Codes | None:
                st = by_index.get(i)
                if st is None or name not in st:
                    return None
                return _range_of(st, name, 0, lo, hi, self._device)

            return _LoadPlan(new_groups, steps, fetch, (summary_groups, steps, [("the checkpoint", "a state dict")]))

        # Sharded: collect every shard's pieces per param, then check they cover what this rank owns.
        pieces: list[list[tuple[int, int, dict]]] = [[] for _ in range(n)]
        shard_steps: list[float | None] = [None] * n
        for k, sd in enumerate(shards):
            meta = sd.get("zero")
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError(f"state dict {k} of the list is not a ZeroAdamW.state_dict() shard")
            state, ranges = sd.get("state"), meta.get("ranges")
            if not isinstance(state, dict) or not isinstance(ranges, dict):
                raise ValueError(f"shard {k} of the list has no 'state' or no 'ranges' dict")
            saved_numels = list(meta.get("numels", ()))
            if saved_numels != numels:
                if len(saved_numels) != n:
                    raise ValueError(f"the checkpoint has {len(saved_numels)} params, this optimizer has {n}")
                bad = next(i for i in range(n) if saved_numels[i] != numels[i])
                raise ValueError(
                    f"param {bad} has {saved_numels[bad]} elements in the checkpoint but {numels[bad]} here "
                    f"(shape {tuple(self._params[bad].shape)})"
                )
            for i in range(n):
                st = state.get(i)
                if not isinstance(st, dict) or "step" not in st:
                    raise ValueError(f"shard {k} of the list has no state 'step' for param {i}")
                step = _check_state_step(st, i)
                if shard_steps[i] is None:
                    shard_steps[i] = step
                elif step != shard_steps[i]:
                    raise ValueError(
                        f"state 'step' of param {i} is {shard_steps[i]} in shard 0 but {step} in shard {k} of the list"
                    )
            for i, rng in ranges.items():
                if not (isinstance(i, int) and 0 <= i < n):
                    raise ValueError(f"shard {k} of the list has a range for param {i!r}, which does not exist")
                if not (
                    isinstance(rng, (tuple, list)) and len(rng) == 2 and all(isinstance(x, int) for x in rng)
                    and 0 <= rng[0] <= rng[1] <= numels[i]
                ):  # fmt: skip
                    raise ValueError(
                        f"shard {k} of the list has the range {rng!r} for param {i}, which has {numels[i]} elements"
                    )
                lo, hi = rng
                size = f"its range [{lo}, {hi}) in shard {k} of the list has {hi - lo}"
                st = _codes_as_moments(state[i], i)
                for key in required(i):
                    _check_moment(st, i, key, hi - lo, size, lo)
                for key in (*_MOMENT_KEYS[len(required(i)) :], _MASTER_KEY):
                    if key in st:
                        _check_moment(st, i, key, hi - lo, size, lo)
                pieces[i].append((lo, hi, st))
        for seg in self._segment_of.values():
            covered = seg.lo
            for lo, hi, _ in sorted(pieces[seg.index], key=lambda x: x[0]):
                if lo <= covered < hi:
                    covered = hi
            if covered < seg.hi:
                world = shards[0]["zero"].get("world_size", "?")
                raise ValueError(
                    f"the shards given cover elements up to {covered} of param {seg.index} but this rank needs "
                    f"[{seg.lo}, {seg.hi}); pass the list of all {world} ranks' state dicts"
                )
        steps = [float(s) for s in shard_steps]  # every shard has every param's step (checked)

        def fetch_sharded(i: int, name: str, lo: int, hi: int) -> Tensor | _Codes | None:
            parts: list[tuple[int, int, Tensor | _Codes]] = []
            for plo, phi, st in sorted(pieces[i], key=lambda x: x[0]):
                a, z = max(lo, plo, parts[-1][1] if parts else lo), min(hi, phi)  # (overlaps: the first shard's)
                if a >= z:
                    continue
                if name not in st:  # an optional key (master weights) some shard lacks: none for this param
                    return None
                parts.append((a, z, _range_of(st, name, plo, a, z, self._device)))
            if all(isinstance(part, _Codes) for _, _, part in parts) and all(
                (z - a) % QUANT_BLOCK == 0 for a, z, _ in parts[:-1]
            ):  # blocks line up: the codes as saved
                return _Codes(torch.cat([part.codes for _, _, part in parts]),
                              torch.cat([part.scales for _, _, part in parts]))  # fmt: skip
            values = [part.values(_SIGNED[name]) if isinstance(part, _Codes) else part for _, _, part in parts]
            return torch.cat(values)

        return _LoadPlan(
            new_groups, steps, fetch_sharded, (summary_groups, steps, [("the checkpoint", "a state dict")])
        )
