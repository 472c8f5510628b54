"""Where this process sits: global rank / world size, and the dataloader worker.

The rank comes from an initialized ``torch.distributed`` process group, else from the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``). ``LOCAL_RANK`` is the index *on this node* (it picks the GPU); it is
never used as the global rank -- on two nodes that would make ranks 0 and 8 read the same
samples and leave others unread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from giblet.errors import ConfigError


@dataclass(frozen=True)
class World:
    """One process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r} is not an integer; launch with torchrun "
                          f"or unset {name}") from None


def world_from_env(env: Optional[Mapping[str, str]] = None) -> World:
    """The world described by torchrun's environment variables (single process if unset)."""
    env = os.environ if env is None else env
    rank, size = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
    local_rank, local_size = _int_env(env, "LOCAL_RANK"), _int_env(env, "LOCAL_WORLD_SIZE")
    if rank is None and size not in (None, 1):
        raise ConfigError(f"environment WORLD_SIZE={size} but RANK is unset (LOCAL_RANK={local_rank}); "
                          f"the global rank is never taken from LOCAL_RANK: launch with torchrun, which sets RANK")
    if rank is not None and size is None:
        raise ConfigError(f"environment RANK={rank} but WORLD_SIZE is unset; launch with torchrun or set both")
    rank, size = rank or 0, size or 1
    if not 0 <= rank < size:
        raise ConfigError(f"environment RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
    local_rank = 0 if local_rank is None else local_rank
    local_size = local_size or 1
    return World(rank=rank, world_size=size, local_rank=local_rank, local_world_size=local_size)


def get_world() -> World:
    """This process's world: the process group if one is initialized, else the environment."""
    env_world = world_from_env()
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return env_world
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=env_world.local_rank, local_world_size=env_world.local_world_size)
    return env_world


def get_worker() -> tuple[int, int]:
    """``(worker id, number of workers)`` inside a DataLoader worker; ``(0, 1)`` in the main process."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
