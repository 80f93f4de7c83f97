"""Agreement across ranks: one all-reduce (MAX) of a small flag vector per step.

If one rank sees a NaN and skips while another applies its step, the replicas drift apart, and
if one rank rolls back while another does not, the next collective hangs. The guard therefore
decides from flags that every rank holds identically: the element-wise maximum over the group.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def agree_(flags: Tensor, group: Any = None) -> Tensor:
    """All-reduce ``flags`` in place with MAX over ``group``, so every rank decides alike.

    A no-op on a single process. Asynchronous on accelerators (NCCL enqueues the reduction on the
    stream); no value is read on the host.

    Args:
        flags: a 1-D float tensor of 0/1 flags (and non-negative scores) on the gradients' device.
        group: the process group (``None``: the default group).

    Returns:
        ``flags``, reduced.
    """
    if world_size(group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags
