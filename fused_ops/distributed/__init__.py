"""ZeroAdamW: ZeRO stage 1/2 partitioned AdamW on ``torch.distributed`` collectives.

Layout. Params are grouped by (param group, dtype) and packed, in reverse registration order (the order in
which backward produces their grads), into flat buckets of at most ``bucket_cap_mb``. Each param starts at a
multiple of ``align`` elements and each bucket is padded to a multiple of ``world_size * align``, so it splits
into ``world_size`` equal, aligned shards. The model's params become views into their bucket's flat buffer,
so the all-gather after the step writes straight into them. Rank ``r`` owns shard ``r`` of every bucket and
keeps, for that shard only: the fp32 master copy (low-precision params with ``master_weights``), the fp32
Adam moments and the reduced-gradient shard, in the reduce dtype (by default the param dtype: bf16 for bf16
params, so a bf16 model with fp32 masters holds 2 + 14/N bytes per param in stage 2; ``reduce_dtype=
torch.float32`` reduces and accumulates in fp32, 2 + 16/N). The fused Adam op reads either directly. With
``state_dtype="int8"`` the moments are uint8 codes with one fp32 scale per 256-element block of the shard (align is
a multiple of 256: blocks are the params' own) and the low-bit Adam kernel steps them; ``"bfloat16"``: bf16 moments,
stochastically rounded.

Per step::

    backward  --(stage 2: per bucket, as soon as its grads exist)-->  reduce-scatter (sum) into the grad shard
    step()    --(stage 1: all buckets now)--------------------------->  reduce-scatter (sum) into the grad shard
              all-reduce(sum) of the shard's squared norm (accumulated in float64, whatever the shard's dtype)
                                                          -> global grad norm, found_inf (on the device)
                 ... and, in the same all-reduce, the ranks' agreement: how many ranks found a bad value or grad,
                 and the bits of every step value (each rank's must be identical): read on the host, the step's
                 one sync; on a problem every rank raises the same error, before anything has changed
              fused Adam (fused_ops.functional.adam_) on the shard; 1/world, 1/loss_scale and the clip
              coefficient are one device-side grad_scale
              (with fp32 masters, the same pass writes the rounded low-precision params)
              all-gather of every bucket into the params

Collectives are launched in bucket order on every rank (a bucket whose grads are ready waits for the buckets
before it), so ranks whose backward produces grads in different orders, or not at all for some params, still
issue the same sequence of collectives. At the end of each backward pass every bucket not yet reduced is
reduced, with zeros for params that got no grad.

Checkpoints: ``state_dict()`` is this rank's shard, ``consolidated_state_dict(to=0)`` is torch.optim.AdamW's
layout; ``load_state_dict`` takes either (or the list of all ranks' shards) with any world size.
``dcp_state_dict()`` is for ``torch.distributed.checkpoint``: each param's states as DTensors of the param's
shape, ``Shard(0)`` over the process group (FSDP2's layout), which DCP saves sharded and reshards on load;
``load_dcp_state_dict`` loads the dict DCP filled, saved with any world size.

Files: ``_layout.py`` (buckets, shards, padding, memory), ``_reduce.py`` (grad hooks and reduce-scatters),
``_step.py`` (the step), ``_agree.py`` (validation and agreement between ranks), ``_checkpoint.py`` (state dicts
and loading), ``_dcp.py`` (DCP: DTensor state dicts), ``_comm.py`` (the collectives, with gloo fallbacks),
``_optimizer.py`` (the class and its constructor), ``_bench.py`` (``benchmark_zero``).
"""

from ._bench import benchmark_zero
from ._layout import BucketSpec, build_layout  # noqa: F401 (imported from here by tests and tools)
from ._optimizer import ZeroAdamW

__all__ = ["ZeroAdamW", "benchmark_zero"]
