"""torch.distributed plumbing: one process per device, launched by ``torchrun``.

Everything here is a no-op in a plain (single-process) run, so code can call ``barrier()`` or
``all_reduce_sum()`` unconditionally. A run is distributed when it was started by ``torchrun``
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` in the environment) and
:func:`init_distributed` has been called; rank/world queries read the process group, never the
environment alone, so a process that was launched distributed but never joined the group cannot
silently shard its data without synchronising gradients.

Backends: gloo on CPU, NCCL on CUDA (each process then owns ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from teachx.errors import ConfigError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or an equivalent launcher) with world > 1."""
    return all(k in os.environ for k in _ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the torchrun environment variables; idempotent.

    Returns the single-process ``DistInfo()`` when not launched distributed. ``backend`` defaults to
    NCCL when CUDA is available (and sets this process's device to ``cuda:LOCAL_RANK``), else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched_distributed():
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run with one process (no --nproc)")
    local = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s); use at most that many processes per node"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info()


def shutdown() -> None:
    """Leave the process group at the normal end of a distributed run; no-op otherwise.

    The barrier first keeps a fast rank from tearing down its connections while a slower one still
    talks to it (gloo aborts on a reset connection). Do not call it on an error path: a rank that
    failed alone would wait at the barrier; torchrun stops the others instead.
    """
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_backend()
    )


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """A process group with more than one process is up: collective calls are needed."""
    return world_size() > 1


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (it is also returned); NCCL tensors may live on the CPU."""
    if not is_distributed():
        return tensor
    dev = _comm_device()
    if tensor.device == dev:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    buf = tensor.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    tensor.copy_(buf)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics...) to every rank, in place.

    DDP syncs buffers at the start of each training forward, so after the last step the ranks'
    running statistics differ by that step's local update; call this before evaluating or saving.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        if buf.dtype != torch.bool:
            tmp = buf.data.to(_comm_device())
            dist.broadcast(tmp, src=src)
            if tmp is not buf.data:
                buf.data.copy_(tmp)


def device_for(device: torch.device) -> torch.device:
    """The device this rank should use: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed run."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a logging/printing function so that only rank 0 emits (other ranks drop the call)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if is_main():
            return fn(*args, **kwargs)
        return None

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only (e.g. a file write), then barrier and hand its result to every rank.

    An exception on rank 0 is re-raised on every rank (as the same exception type when it
    pickles), so no rank is left waiting at the barrier.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result: Any = None
    error: Optional[BaseException] = None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - forwarded to the other ranks below
            error = exc
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001
                error = RuntimeError(f"{type(exc).__name__}: {exc}")
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def main_first(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0, barrier, then on the other ranks; every rank returns its own result.

    For work that fills a shared cache the first time (dataset download/decoding): rank 0 does it
    alone, the others then find it done instead of racing to write the same files.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    result = on_main(fn, *args, **kwargs)
    if is_main():
        return result
    return fn(*args, **kwargs)
