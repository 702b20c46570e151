"""Launch checks shared by the multi-tensor launchers of cast.py, scale.py and flatten.py.

A multi-tensor kernel reads (and writes) ``numel`` elements of its compiled dtype from each address of its chunk
table: every tensor must be dense (strided), contiguous, of its role's dtype, on the launch device, with the element
count of its table entry; a scalar argument (a scale, a flag, a key) must be one element of the expected kind on
the launch device, because the kernel reads it through a raw pointer. The table is cached by address, so these run
on every call, not once per layout: a cached address may hold another tensor now.

Host time counts (10,000 tensors per launch): each check is a few passes over the list (sets of dtypes, devices
and layouts; one contiguity pass) and falls back to a loop that names the first offending tensor only when a pass
fails.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

# A kernel reads a tensor's elements at ``data_ptr()``: not so for a subclass with a dispatch of its own (DTensor,
# wrapper subclasses), whose address may be null or another tensor's.
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def check_role(fn: str, name: str, tensors: Sequence, dtypes: Collection[torch.dtype],
               device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """Every tensor of ``tensors`` dense, contiguous, of one dtype (one of ``dtypes``: ``dtype`` when given, else
    the first tensor's) and on one device (``device`` when given, else the first tensor's)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{fn}: {name}[0] must be a Tensor, got {type(first).__name__}")
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else device
    try:
        if (
            all(getattr(cls, "__torch_dispatch__", None) is _PLAIN_DISPATCH for cls in {type(x) for x in tensors})
            and dtype in dtypes
            and {x.dtype for x in tensors} == {dtype}
            and {x.device for x in tensors} == {device}
            and {x.layout for x in tensors} == {torch.strided}
            and all(map(torch.Tensor.is_contiguous, tensors))
        ):
            return
    except AttributeError:  # not a tensor: named below
        pass
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name}[{i}] must be a Tensor, got {type(x).__name__}")
        if getattr(type(x), "__torch_dispatch__", None) is not _PLAIN_DISPATCH:  # DTensor, wrapper subclasses
            raise TypeError(f"{fn}: {name}[{i}] is a {type(x).__name__}, not a plain tensor with memory of its own")
        if x.layout != torch.strided:
            raise TypeError(f"{fn}: {name}[{i}] must be a dense tensor, got {x.layout}")
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            allowed = allowed.rsplit(", ", 1)[0] + " or " + allowed.rsplit(", ", 1)[1] if len(dtypes) > 1 else allowed
            raise TypeError(f"{fn}: {name}[{i}] must be {allowed}, got {x.dtype}")
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"{fn}: {name}[{i}] is {x.dtype} on {x.device}, expected {dtype} on {device}")
        if not x.is_contiguous():
            raise ValueError(f"{fn}: {name}[{i}] must be contiguous")


def check_numels(fn: str, name: str, tensors: Sequence[torch.Tensor], like_name: str,
                 like: Sequence[torch.Tensor]) -> None:  # fmt: skip
    """``tensors[i]`` has as many elements as ``like[i]``, for every i (same lengths)."""
    if len(tensors) != len(like):
        raise ValueError(f"{fn}: {name} has {len(tensors)} tensors, {like_name} has {len(like)}")
    if list(map(torch.Tensor.numel, tensors)) == list(map(torch.Tensor.numel, like)):
        return
    for i, (x, y) in enumerate(zip(tensors, like, strict=True)):
        if x.numel() != y.numel():
            raise ValueError(f"{fn}: {name}[{i}] has {x.numel()} elements, {like_name}[{i}] has {y.numel()}")


def check_scalar(fn: str, name: str, x, device: torch.device, dtypes: Collection[torch.dtype] | None = None) -> None:
    """``x`` is a dense 1-element tensor on ``device``, floating point (or of one of ``dtypes``)."""
    ok_dtype = (isinstance(x, torch.Tensor) and getattr(type(x), "__torch_dispatch__", None) is _PLAIN_DISPATCH
                and (x.dtype in dtypes if dtypes is not None else x.is_floating_point()))  # fmt: skip
    if not ok_dtype or x.layout != torch.strided or x.numel() != 1 or x.device != device:
        kind = "floating-point" if dtypes is None else "/".join(str(d).removeprefix("torch.") for d in dtypes)
        got = (f"{x.numel()} elements of {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
               else type(x).__name__)  # fmt: skip
        raise ValueError(f"{fn}: {name} must be a 1-element {kind} tensor on {device}, got {got}")
