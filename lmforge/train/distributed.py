"""Scale-out with PyTorch's own engine, applied to the model from outside.

``torchrun --nproc_per_node=N -m lmforge train ...`` sets RANK/WORLD_SIZE; we pick gloo on
CPU and nccl on GPU, then wrap the finished model in DDP, or shard it with FSDP2
(``fully_shard``) block by block. The model code knows nothing about any of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.model.model import build_model


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def world_size() -> int:
    """How many ranks this launch has (torchrun sets WORLD_SIZE), known before :func:`setup`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> DistInfo:
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
        # Processes on one host share its cores; oversubscribing threads costs more than it gains.
        # OMP_NUM_THREADS, when set, is the user's own split (two runs side by side, say) and wins.
        if not os.environ.get("OMP_NUM_THREADS"):
            cores = os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // max(1, local_world)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, local_world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """Wrap ``model`` for data parallelism: DDP by default, FSDP2 when it won't fit on one device."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_full_state(model, optimizer, info: DistInfo) -> dict:
    """Unsharded model (a plain GPT on CPU, rank 0 only) and optimizer state under FSDP2.

    Every rank must call this: gathering is a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    full = None
    if info.is_main:
        full = build_model(model.cfg, "cpu")
        full.load_state_dict(sd)
    return {"model": full, "optimizer": osd}


def set_full_model_state(model, state_dict: dict) -> None:
    """Load an unsharded state dict into an FSDP2-sharded model (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state: dict | None, fsdp: bool) -> None:
    """Restore optimizer state saved by a checkpoint; None (saved before the first step) means a fresh one."""
    if state is None:
        optimizer.state.clear()
        return
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
