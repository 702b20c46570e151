"""Parameter sets (lists of tensor shapes: GPT-2 124M, a Llama-like 1.1B, 10,000 small tensors) and the inputs
built from them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_PARAMS = ("gpt2-124m", "llama-1b", "small-10k")


@dataclasses.dataclass
class ParamSet:
    """A named list of tensor shapes: ``shapes(quick, device_kind)`` returns (shapes, note on any scaling)."""

    name: str
    description: str
    shapes: Callable[[bool, str], tuple[list[tuple[int, ...]], str]]


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 parameter shapes (Hugging Face layout, tied lm_head): 124,439,808 parameters in 148 tensors."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def llama_shapes(
    vocab: int = 32000, d: int = 2048, layers: int = 22, ffn: int = 5632, kv: int = 256
) -> list[tuple[int, ...]]:
    """Llama parameter shapes (defaults: TinyLlama-1.1B, grouped-query attention): 1.1B parameters."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d)]  # input norm, q, k, v, o
        shapes += [(d,), (ffn, d), (ffn, d), (d, ffn)]  # post-attention norm, gate, up, down
    return shapes + [(d,), (vocab, d)]  # final norm, lm_head


_SMALL_NUMELS = (64, 128, 256, 768, 1024, 2048, 4096, (32, 32), (48, 64), (3, 256))


def small_shapes(n: int = 10_000) -> list[tuple[int, ...]]:
    """``n`` small tensors (biases, norms, small matrices; 1,325 elements on average): the launch-overhead case."""
    return [s if isinstance(s, tuple) else (s,) for s in (_SMALL_NUMELS[i % len(_SMALL_NUMELS)] for i in range(n))]


def _gpt2(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return gpt2_shapes(vocab=4096, ctx=256, d=96), "scaled for a quick CPU run: vocab 4096, ctx 256, d 96"
    return gpt2_shapes(), ""


def _llama(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return llama_shapes(vocab=4000, d=128, layers=4, ffn=352, kv=32), "scaled for a quick CPU run: d 128, 4 layers"
    if kind == "cpu":
        return llama_shapes(layers=2), "2 of 22 layers on CPU"
    if quick:
        return llama_shapes(layers=4), "4 of 22 layers (--quick)"
    return llama_shapes(), ""


def _small(quick: bool, kind: str) -> tuple[list[tuple[int, ...]], str]:
    if kind == "cpu" and quick:
        return small_shapes(1000), "1,000 of the 10,000 tensors (quick CPU run)"
    return small_shapes(), ""


PARAM_SETS: dict[str, ParamSet] = {
    p.name: p
    for p in (
        ParamSet("gpt2-124m", "GPT-2 124M: 148 tensors, 124.4M parameters", _gpt2),
        ParamSet("llama-1b", "Llama-like 1.1B (TinyLlama shapes): 201 tensors", _llama),
        ParamSet("small-10k", "10,000 small tensors (launch overhead)", _small),
        ParamSet("tiny", "8 small odd-sized tensors (tests)", lambda q, k: ([(17, 5), (64,), (3, 7, 11), (1,),
                                                                           (128, 33), (255,), (2, 2), (1000,)], "")),
    )
}  # fmt: skip


def numel(shapes: Sequence[tuple[int, ...]]) -> int:
    """Elements in a list of shapes."""
    return sum(math.prod(s) for s in shapes)


def make_tensors(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int
) -> list[Tensor]:
    """Fresh, separately allocated tensors with normal(0, 1) values; same values for the same seed."""
    sizes = [math.prod(s) for s in shapes]
    gen = torch.Generator(device=device).manual_seed(seed)
    flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=torch.float32)
    return [chunk.view(s).to(dtype, copy=True) for chunk, s in zip(flat.split(sizes), shapes, strict=True)]


def params_with_grads(
    shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> list[torch.nn.Parameter]:
    """Parameters (normal x 0.02) with their grads set (normal x 0.01): an optimizer step's inputs."""
    params = [torch.nn.Parameter(t * 0.02) for t in make_tensors(shapes, dtype, device, seed=0)]
    for p, g in zip(params, make_tensors(shapes, dtype, device, seed=1), strict=True):
        p.grad = g * 1e-2
    return params
