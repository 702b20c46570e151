"""Low-bit FusedAdamW trains a small transformer as well as fp32 AdamW does (issue 11).

A 2-layer GPT (d_model 32, 4 heads, MLP 4x, no biases, vocab 64, context 32; 29,856 params in 16 tensors) learns
next-token prediction on sequences of a fixed random Markov chain (every token has 4 successors with fixed random
probabilities): 500 steps of batch 16, lr 3e-4, betas (0.9, 0.999), no weight decay, fixed seeds, on CPU with one
thread. The loss starts near ln 64 = 4.16 and the fp32 baseline ends at 1.81-1.84 (the best possible loss, the
chain's conditional entropy on these sequences, is 1.31): the model is still learning at the end, so an optimizer
that loses updates shows.

All runs use ``backend="reference"``, the plain-torch step (``fused_ops/_ref_lowbit.py``, also the CPU path): the
same math as the Triton kernels, with the same Philox bits for stochastic rounding and the same 8-bit codes;
``tests/test_adam_lowbit_kernel.py`` checks the kernels against it. Interpreted kernels would be far too slow for
500 steps. The reference's Philox draws (int64 torch ops, about 1.5 ms per tensor plus 0.3 us per element each
step) cost more than the model's forward and backward: the file takes about 62 s of CPU on one core with
d_model 32, and d_model 64 (109k params) measured about 1.4 times as much, at the 90 s budget; hence d_model 32.

Runs and what is asserted, the metric being the mean training loss over the last 50 steps:

- (a) fp32 params, fp32 states, the baseline: ends below 2.0.
- (b) ``state_dtype="int8"``, fp32 params: within 6% of (a) either way (measured 1.4-2.5% lower: the 8-bit
  moments do not slow learning here, they speed it up slightly).
- (c) ``state_dtype="bfloat16"``, fp32 params: within 1% of (a) (measured 0.00-0.02%).
- (d) bf16 params, no master weights, ``stochastic_rounding=True``: within 1% of (a) (measured 0.18-0.23% higher).
- (e) bf16 params, no master weights, round-to-nearest: at least 0.3 above (d) (measured 0.71-0.74 above: 39-41%).
  Adam moves a weight by at most about lr = 3e-4 per step; half a bf16 ulp is 2^-11 = 4.9e-4 for |w| in
  [1/8, 1/4) (more above), 2.4e-4 in [1/16, 1/8), so nearest rounding drops every update of the 25% of the
  weights above 1/8 at initialisation (embeddings, LayerNorm weights, part of the linear layers) and the smaller
  updates of the 30% between 1/16 and 1/8: they stall. Stochastic rounding keeps them in expectation.
- (f) bf16 params, no master weights, ``kahan_summation=True``: within 1% of (a) (measured 0.00-0.01%).

Measured mean losses over the last 50 steps, seeds 0 / 1 / 2 (the seed of the init and of the sequences; the
test runs seed 0): (a) 1.8206 / 1.8360 / 1.8134; (b) 1.7854 / 1.7900 / 1.7878; (c) 1.8206 / 1.8357 / 1.8132;
(d) 1.8239 / 1.8401 / 1.8175; (e) 2.5289 / 2.5484 / 2.5561; (f) 1.8207 / 1.8360 / 1.8134. The thresholds leave a
factor of two or more: 6% against 2.5% (int8), 1% against 0.23%, a gap of 0.3 against the smallest measured 0.71.

State bytes per param, from the optimizer's own tensors (every tensor in ``opt.state[p]`` but ``step``): fp32
states 8; int8 states 2 + 8 * sum(ceil(n / 256)) / sum(n) over the params' sizes n (uint8 codes of both moments
plus one fp32 scale per 256-element block of each: 2 + 8 * 121 / 29,856 = 2.0324 here); bf16 states 4; bf16
params with fp32 states 8, plus 2 for the Kahan buffer.
"""

import concurrent.futures
import math
import multiprocessing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ops import FusedAdamW

VOCAB, CONTEXT, D_MODEL, N_HEADS, N_LAYERS = 64, 32, 32, 4, 2
STEPS, BATCH, LR = 500, 16, 3e-4
LAST = 50  # steps averaged for the final loss

CONFIGS = {
    "fp32": dict(),
    "int8_states": dict(state_dtype="int8"),
    "bf16_states": dict(state_dtype="bfloat16"),
    "bf16_sr": dict(bf16=True, stochastic_rounding=True),
    "bf16_nearest": dict(bf16=True),
    "bf16_kahan": dict(bf16=True, kahan_summation=True),
}


def _markov_chain(seed: int = 1234, successors: int = 4) -> torch.Tensor:
    """A fixed (VOCAB, VOCAB) transition matrix: every token has ``successors`` next tokens with random weights."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(VOCAB, VOCAB)
    for i in range(VOCAB):
        weights = torch.rand(successors, generator=g) + 0.2
        probs[i, torch.randperm(VOCAB, generator=g)[:successors]] = weights / weights.sum()
    return probs


def _sequences(probs: torch.Tensor, seed: int) -> torch.Tensor:
    """(STEPS, BATCH, CONTEXT + 1) token ids: uniform first tokens, then the chain."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (STEPS * BATCH,), generator=g)
    seq = [x]
    for _ in range(CONTEXT):
        x = torch.multinomial(probs[x], 1, generator=g).squeeze(1)
        seq.append(x)
    return torch.stack(seq, 1).view(STEPS, BATCH, CONTEXT + 1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL, bias=False), nn.LayerNorm(D_MODEL, bias=False)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
        self.proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.fc = nn.Linear(D_MODEL, 4 * D_MODEL, bias=False)
        self.out = nn.Linear(4 * D_MODEL, D_MODEL, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, N_HEADS, D_MODEL // N_HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, D_MODEL))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, D_MODEL))
        self.blocks = nn.ModuleList(_Block() for _ in range(N_LAYERS))
        self.ln = nn.LayerNorm(D_MODEL, bias=False)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _state_bytes_per_param(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    total = sum(t.nbytes for p in params for k, t in opt.state[p].items() if k != "step")
    return total / sum(p.numel() for p in params)


def _train(config: dict, seed: int = 0) -> tuple[list[float], float]:
    """Train a fresh model with ``config``; return the losses and the optimizer's state bytes per param."""
    config = dict(config)
    torch.manual_seed(seed)
    model = _GPT()
    if config.pop("bf16", False):
        model = model.to(torch.bfloat16)
    params = list(model.parameters())
    opt = FusedAdamW(params, lr=LR, weight_decay=0.0, backend="reference", **config)
    data = _sequences(_markov_chain(), seed + 1)
    losses = []
    for batch in data:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _state_bytes_per_param(opt, params)


def _train_one_thread(name: str) -> tuple[list[float], float]:
    """``_train(CONFIGS[name])`` with one torch thread (the run time does not depend on the host's core count, and
    reductions are ordered the same everywhere)."""
    torch.set_num_threads(1)
    return _train(CONFIGS[name])


@pytest.fixture(scope="module")
def runs():
    """Trains every configuration once, two at a time in worker processes (each on one thread: the same numbers as
    in this process, in half the time on two cores)."""
    context = multiprocessing.get_context("spawn")  # (no fork of a process whose torch threads are running)
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = {name: pool.submit(_train_one_thread, name) for name in CONFIGS}
        results = {name: future.result() for name, future in futures.items()}
    return results.__getitem__


def _final(losses: list[float]) -> float:
    assert all(math.isfinite(x) for x in losses), "a loss is not finite"
    return sum(losses[-LAST:]) / LAST


def test_state_bytes_per_param(runs):
    model = _GPT()
    sizes = [p.numel() for p in model.parameters()]
    n = sum(sizes)
    assert runs("fp32")[1] == 8.0
    assert runs("int8_states")[1] == 2 + 8 * sum(math.ceil(s / 256) for s in sizes) / n
    assert runs("bf16_states")[1] == 4.0
    assert runs("bf16_sr")[1] == 8.0
    assert runs("bf16_nearest")[1] == 8.0
    assert runs("bf16_kahan")[1] == 10.0


def test_baseline_learns(runs):
    losses, _ = runs("fp32")
    assert losses[0] > 4.0 and _final(losses) < 2.0


@pytest.mark.parametrize(
    "name, rel_tol", [("int8_states", 0.06), ("bf16_states", 0.01), ("bf16_sr", 0.01), ("bf16_kahan", 0.01)]
)
def test_lowbit_tracks_fp32(runs, name, rel_tol):
    base, final = _final(runs("fp32")[0]), _final(runs(name)[0])
    assert abs(final - base) <= rel_tol * base, f"{name}: final loss {final:.4f}, fp32 {base:.4f}"


def test_bf16_nearest_rounding_stalls(runs):
    """Round-to-nearest bf16 params drop the small updates that stochastic rounding keeps in expectation."""
    sr, nearest = _final(runs("bf16_sr")[0]), _final(runs("bf16_nearest")[0])
    assert nearest >= sr + 0.3, f"nearest {nearest:.4f}, stochastic {sr:.4f}"
