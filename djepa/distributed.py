"""One process or many: the process group torchrun describes, and the few collectives the
training loop needs (gather/broadcast of Python objects, a mean, and agreement on stopping)."""
import atexit
import gc
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device=None) -> Dist:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1):
    NCCL with one GPU per local rank when GPUs are visible, gloo on the CPU. Otherwise one
    process on `device` (default: the GPU when there is one)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
        atexit.register(gc.collect)  # error paths: see teardown
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                device=dev, initialized_here=initialized_here)


def teardown(info: Dist) -> None:
    """Leave the process group if `setup_distributed` joined it.

    DDP sits in reference cycles, so it outlives the training loop until a garbage collection,
    and it holds the process group: left to the collection in the interpreter's finalization,
    the group's worker threads decref tensors while Python shuts down, and the process aborts
    ("terminate called without an active exception", seen under load with gloo). So collect
    here, while the interpreter is alive; on an error path the traceback still holds the loop's
    frames, and the collection registered at exit by setup_distributed frees them."""
    if info.initialized_here:
        import torch.distributed as dist

        gc.collect()
        dist.destroy_process_group()


def all_gather_object(info: Dist, obj) -> list:
    if info.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(info: Dist, t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks (a CPU tensor)."""
    if info.world == 1:
        return t
    import torch.distributed as dist

    t = t.to(info.device)
    dist.all_reduce(t)
    return (t / info.world).cpu()


def any_rank(info: Dist, flag: int) -> int:
    """The largest `flag` (an int >= 0) of all ranks, so that every rank takes the same branch."""
    if info.world == 1:
        return int(flag)
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
