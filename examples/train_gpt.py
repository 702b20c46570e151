"""Train a small GPT with fused_ops.FusedAdamW: one device, FSDP2, or FSDP2 + tensor parallel on a 2-D mesh.

One device (CPU, or the first GPU):
    python examples/train_gpt.py --mode single
FSDP2 (``fully_shard`` on every block and the root), N processes:
    torchrun --nproc_per_node=2 examples/train_gpt.py --mode fsdp2
FSDP2 + tensor parallel on a (dp, tp) mesh; world size = dp * tp, ``--tp`` sets tp (default 2):
    torchrun --nproc_per_node=4 examples/train_gpt.py --mode fsdp2_tp --tp 2

The same file runs on CPU (gloo) and on GPUs (NCCL, one GPU per process): the process-group backend follows
``torch.cuda.is_available()``. The data is character-level text generated here (no downloads), identical on
every rank; each data-parallel rank draws its own batches, the tensor-parallel ranks of one dp group the same.
``--backend`` is fused_ops' backend: ``auto`` (Triton kernel on CUDA, torch's CPU Adam kernel on CPU),
``triton`` (on CPU this sets TRITON_INTERPRET=1 first: the kernel runs under the Triton interpreter, slowly) or
``reference`` (plain torch). Rank 0 prints the loss (averaged over ranks) every ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -- data: character-level text made up here ------------------------------------------------------------------


def make_corpus(n_chars: int = 50_000, seed: int = 1234) -> str:
    """Sentences from a tiny grammar: enough structure for the loss to fall within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour"]
    verbs = ["sees", "likes", "follows", "finds", "paints", "visits", "remembers"]
    objects = ["the house", "a red ball", "the river", "an apple", "the garden", "a long road", "the moon"]
    ends = [".", "!", " today.", " again.", " at night."]

    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=g))]

    parts, n = [], 0
    while n < n_chars:
        s = f"{pick(subjects)} {pick(verbs)} {pick(objects)}{pick(ends)}\n"
        parts.append(s)
        n += len(s)
    return "".join(parts)


class CharData:
    def __init__(self, text: str, device: torch.device) -> None:
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.device = device

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(len(self.data) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([self.data[s : s + seq_len] for s in starts.tolist()])
        y = torch.stack([self.data[s + 1 : s + seq_len + 1] for s in starts.tolist()])
        return x.to(self.device), y.to(self.device)


# -- model: a small GPT in plain torch.nn -------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    # Separate q, k, v projections (not one fused qkv Linear): column-wise sharding then gives each tensor-parallel
    # rank whole heads of q, k and v. The head count is read from the projection's (possibly local) output.
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.head_dim = n_embd // n_head
        self.q = nn.Linear(n_embd, n_embd)
        self.k = nn.Linear(n_embd, n_embd)
        self.v = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # Untied head: tying it to the embedding would make one param both row- and column-parallel under TP.
    def __init__(self, vocab_size: int, seq_len: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with ``targets`` the mean cross-entropy (computed inside, so that the FSDP root returns a
        fresh scalar rather than a view of the logits)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, LayerNorm weights or embeddings), as usual for GPTs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- parallelism --------------------------------------------------------------------------------------------------


def apply_fsdp2(model: GPT, dp_mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def apply_tp(model: GPT, tp_mesh) -> None:
    """Megatron-style TP: q, k, v and fc column-wise, the two output projections row-wise (one all-reduce each
    per block). Every other module (embeddings, LayerNorms, head) keeps a replicated copy of its params, as
    DTensors on the tp mesh, so that after ``fully_shard`` every param lives on the same 2-D mesh (grad clipping
    stacks the per-param norms, which DTensor only allows on one mesh)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
        })  # fmt: skip

    def to_replicate(mod, inputs, mesh):  # plain tensors in -> replicated DTensors
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def to_local(mod, output, mesh):  # replicated DTensor out -> plain tensor
        return output.to_local()

    replicated = [model.wte, model.wpe, model.ln_f, model.head]
    replicated += [m for block in model.blocks for m in (block.ln_1, block.ln_2)]
    for mod in replicated:
        distribute_module(mod, tp_mesh, input_fn=to_replicate, output_fn=to_local)


# -- training -----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("single", "fsdp2", "fsdp2_tp"), default="single")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="fused_ops backend of FusedAdamW")  # fmt: skip
    p.add_argument("--optimizer", choices=("fused", "torch"), default="fused",
                   help="fused_ops.FusedAdamW, or torch.optim.AdamW(fused=True) to compare against")  # fmt: skip
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (--mode fsdp2_tp); dp = world / tp")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per data-parallel rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    if args.backend == "triton" and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernel on CPU tensors: must be set before triton imports
    import fused_ops

    distributed = args.mode != "single"
    rank, world = 0, 1
    if distributed:
        if cuda:  # one GPU per process, before NCCL starts
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device_type = device.type
    log = print if rank == 0 else (lambda *a, **k: None)

    data = CharData(make_corpus(), device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(data.vocab_size, args.seq_len, args.n_layer, args.n_head, args.n_embd).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    dp_rank, dp = 0, 1
    if args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
        dp_rank, dp = mesh.get_local_rank(), world
        apply_fsdp2(model, mesh)
    elif args.mode == "fsdp2_tp":
        from torch.distributed.device_mesh import init_device_mesh

        if world % args.tp or args.n_head % args.tp:
            raise SystemExit(f"--tp {args.tp} must divide the world size ({world}) and --n-head ({args.n_head})")
        dp = world // args.tp
        mesh = init_device_mesh(device_type, (dp, args.tp), mesh_dim_names=("dp", "tp"))
        # A flattened (dp*tp) view of the mesh lets DTensor reduce the grad norm in clip_grad_norm_ with one
        # all-reduce instead of one per mesh dim (torch warns otherwise). DeviceMesh._flatten is private
        # (torchtitan uses it the same way); without it everything still works.
        if hasattr(mesh, "_flatten"):
            mesh._flatten("dp_tp")
        dp_rank = mesh["dp"].get_local_rank()
        apply_tp(model, mesh["tp"])
        apply_fsdp2(model, mesh["dp"])

    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "fused":
        opt = fused_ops.FusedAdamW(groups, lr=args.lr, betas=(0.9, 0.95), backend=args.backend)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    log(f"mode={args.mode} world={world} dp={dp} tp={world // dp} device={device} "
        f"optimizer={type(opt).__name__} backend={args.backend if args.optimizer == 'fused' else '-'} "
        f"params={n_params:,} vocab={data.vocab_size}", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    for step in range(args.steps):
        # each dp rank its own batch; the tp ranks of one dp group the same one
        x, y = data.batch(args.batch_size, args.seq_len, seed=args.seed * 1_000_003 + step * 1009 + dp_rank)
        loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            report = loss.detach().clone()
            if distributed:
                dist.all_reduce(report)  # (log steps only: reading the loss waits for the device)
                report /= world
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            log(f"step {step:5d} loss {report.item():.4f} grad_norm {float(norm):.3f} "
                f"lr {sched.get_last_lr()[0]:.2e}", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - t0
    log(f"done: {args.steps} steps in {elapsed:.1f} s ({elapsed / max(args.steps, 1) * 1e3:.0f} ms/step)", flush=True)
    if distributed:
        dist.barrier()  # (every rank done with its collectives before any tears the group down: gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
