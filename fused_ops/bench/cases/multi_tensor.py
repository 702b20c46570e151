"""The multi-tensor ops around the optimizer step: ``flatten``, ``cast``, ``unscale`` and ``grad_norm``, each
against torch's for-loop and foreach equivalents (and its single-kernel one where torch has it)."""

from __future__ import annotations

import torch
from torch import Tensor

import fused_ops

from .._registry import Builder, Runner, Skip, has, register_op
from ..params import make_tensors
from ._common import simple_runner


# flatten: read every tensor, write the flat buffer (padding not counted): 2 x element size.
@register_op("flatten", "fused_ops.flatten", has("flatten"), bytes_per_element={"fp32": 8, "bf16": 4})
def _flatten_providers() -> dict[str, Builder]:
    """Gather many tensors into one new flat buffer."""

    def fused(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        return simple_runner("flatten", dtype, shapes, lambda: fused_ops.flatten(ts))

    def forloop(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        sizes = [t.numel() for t in ts]

        def fn() -> Tensor:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            for view, t in zip(flat.split(sizes), ts, strict=True):
                view.copy_(t.view(-1))
            return flat

        return simple_runner("flatten", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        sizes = [t.numel() for t in ts]
        flat_ts = [t.view(-1) for t in ts]

        def fn() -> Tensor:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            torch._foreach_copy_(list(flat.split(sizes)), flat_ts)
            return flat

        return simple_runner("flatten", dtype, shapes, fn)

    def fused_torch(shapes, dtype, device) -> Runner:
        ts = make_tensors(shapes, dtype, device, seed=0)
        return simple_runner("flatten", dtype, shapes, lambda: torch._utils._flatten_dense_tensors(ts))

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


# cast: read the source, write the destination. "bf16" = fp32 -> bf16 (4 + 2 B), "fp32" = bf16 -> fp32 (2 + 4 B).
@register_op("cast", "fused_ops.cast_", has("cast_"), bytes_per_element={"bf16": 6, "fp32": 6})
def _cast_providers() -> dict[str, Builder]:
    """Multi-tensor dtype copy; dtype names the destination: bf16 = fp32 -> bf16, fp32 = bf16 -> fp32."""

    def tensors(shapes, dtype, device) -> tuple[list[Tensor], list[Tensor]]:
        src_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
        src = make_tensors(shapes, src_dtype, device, seed=0)
        return [torch.empty_like(s, dtype=dtype) for s in src], src

    def fused(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)
        return simple_runner("cast", dtype, shapes, lambda: fused_ops.cast_(dst, src))

    def forloop(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)

        def fn() -> None:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

        return simple_runner("cast", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        dst, src = tensors(shapes, dtype, device)
        return simple_runner("cast", dtype, shapes, lambda: torch._foreach_copy_(dst, src))

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch has no single-kernel multi-tensor cast (torch-foreach's _foreach_copy_ is its best)")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


# unscale: read and write every grad (the found_inf flag is negligible): 2 x element size.
@register_op("unscale", "fused_ops.unscale_", has("unscale_"), bytes_per_element={"fp32": 8, "bf16": 4})
def _unscale_providers() -> dict[str, Builder]:
    """Multiply grads by 1/scale in place and raise found_inf on any non-finite value (GradScaler.unscale_)."""

    def setup(shapes, dtype, device):
        grads = make_tensors(shapes, dtype, device, seed=1)
        saved = [g.clone() for g in grads]
        inv_scale = torch.full((1,), 1.0 / 1024, device=device)
        found_inf = torch.zeros(1, device=device)

        def reset() -> None:  # repeated unscaling would drift the grads towards denormals (slow on CPU)
            torch._foreach_copy_(grads, saved)
            found_inf.zero_()

        return grads, inv_scale, found_inf, reset

    def fused(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)
        return simple_runner("unscale", dtype, shapes, lambda: fused_ops.unscale_(grads, inv, found), reset)

    def forloop(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)

        def fn() -> None:
            for g in grads:
                torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv)

        return simple_runner("unscale", dtype, shapes, fn, reset)

    def foreach(shapes, dtype, device) -> Runner:
        grads, inv, found, reset = setup(shapes, dtype, device)
        return simple_runner(
            "unscale", dtype, shapes, lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv), reset
        )

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch's unscale is its foreach kernel (torch-foreach, what GradScaler.unscale_ runs)")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}


# grad_norm: read every grad once: element size.
@register_op("grad_norm", "fused_ops.grad_norm", has("grad_norm"), bytes_per_element={"fp32": 4, "bf16": 2})
def _grad_norm_providers() -> dict[str, Builder]:
    """Total L2 norm over many tensors (what clip_grad_norm_ computes first)."""

    def fused(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        return simple_runner("grad_norm", dtype, shapes, lambda: fused_ops.grad_norm(grads))

    def forloop(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        fn = lambda: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return simple_runner("grad_norm", dtype, shapes, fn)

    def foreach(shapes, dtype, device) -> Runner:
        grads = make_tensors(shapes, dtype, device, seed=1)
        get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: clip_grad_norm_'s first half
        if get_total_norm is not None:
            fn = lambda: get_total_norm(grads, 2.0, foreach=True)
        else:  # pragma: no cover - older torch
            fn = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)))
        return simple_runner("grad_norm", dtype, shapes, fn)

    def fused_torch(shapes, dtype, device) -> Runner:
        raise Skip("torch has no single-kernel multi-tensor norm (torch-foreach is clip_grad_norm_(foreach=True))")

    return {"fused_ops": fused, "torch-forloop": forloop, "torch-foreach": foreach, "torch-fused": fused_torch}
