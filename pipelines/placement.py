"""Where a unit's tasks may run on a cluster of CPU and GPU workers, through Dask worker resources.

A *GPU worker* advertises the Dask resource ``GPU`` (``dask worker ADDRESS --resources GPU=1``;
a LocalCluster started on a machine where torch sees CUDA devices advertises ``GPU=<count>``
on each of its workers, ``pipelines.cluster``). A unit of a model stage (audio, text, or any
stage that loads a model) carries the device it is configured with (``Unit.device``); the
placement of its tasks follows from that device and from the workers present when the build
starts:

- ``cuda`` / ``cuda:N``: every task requests ``GPU=1``, so Dask runs it on a GPU worker only
  (and no more of them at once on a worker than it advertises). A cluster without any GPU
  worker is an error before anything is submitted: the tasks would wait forever.
- ``auto``: decided here, on the driver: ``GPU=1`` is requested when some worker advertises a
  GPU, else nothing (the tasks run anywhere). The worker still resolves ``auto`` itself
  (``giblet.features.media.resolve_device``: cuda when it sees one, else cpu) and the unit's
  meta records the device it used -- so a worker that advertises GPU without a CUDA device
  computes on its CPU, visibly (the loopback test relies on exactly that).
- ``cpu``, or no device (fMRI, video): no request. On a *mixed* cluster (GPU workers and
  workers without) these tasks are restricted to the workers without a GPU, which keeps the
  GPU workers free for the model stages; on a cluster of GPU workers only, they run anywhere.

Everything here is a function of ``Client.scheduler_info()["workers"]`` (address -> worker
info with its ``resources``), so it is tested without a cluster.
"""
from __future__ import annotations

from typing import Optional

from giblet.errors import ConfigError

GPU = "GPU"  # the Dask worker resource name: `dask worker ADDRESS --resources GPU=1`


def local_gpu_count() -> int:
    """CUDA devices torch sees on this machine (0 without CUDA): what a LocalCluster advertises."""
    try:
        import torch
    except ImportError:  # torch is a dependency; a build without it has no model stage anyway
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_workers(workers: dict) -> list[str]:
    """Addresses of the workers that advertise a GPU (``workers``: scheduler_info's), sorted."""
    return sorted(a for a, w in workers.items() if float((w.get("resources") or {}).get(GPU, 0)) > 0)


def explicit_gpu(device: Optional[str]) -> bool:
    """Whether ``device`` names CUDA outright (``cuda``, ``cuda:1``): a GPU worker is required."""
    return bool(device) and device.startswith("cuda")


class Placement:
    """The placement rule of one build, fixed from the workers present when it starts.

    Args:
        workers: ``Client.scheduler_info()["workers"]``.
    """

    def __init__(self, workers: dict):
        gpu = gpu_workers(workers)
        self.has_gpu, self.mixed = bool(gpu), bool(gpu) and len(gpu) < len(workers)

    def wants_gpu(self, device: Optional[str]) -> bool:
        """Whether tasks of a unit on ``device`` request ``GPU=1`` (the module docstring's rule)."""
        return explicit_gpu(device) or (device == "auto" and self.has_gpu)

    def resources(self, unit) -> dict:
        """``client.submit`` keywords for the unit's resource request (empty: none)."""
        return {"resources": {GPU: 1}} if self.wants_gpu(unit.device) else {}

    def restricted(self, unit) -> bool:
        """Whether the unit's tasks need a fixed pool of workers: at most ``max_workers`` of them,
        or a CPU unit on a mixed cluster (kept off the GPU workers)."""
        return bool(unit.max_workers) or (self.mixed and not self.wants_gpu(unit.device))

    def pool(self, unit, workers: dict) -> list[str]:
        """The workers (of ``workers``, those present now) the unit's tasks are pinned to; empty: no
        pin (e.g. every GPU worker left: the resource request alone waits for a new one)."""
        gpu = gpu_workers(workers)
        if self.wants_gpu(unit.device):
            eligible = gpu
        else:  # CPU work: off the GPU workers when there are others, else anywhere
            eligible = sorted(set(workers) - set(gpu)) or sorted(workers)
        return eligible[:unit.max_workers] if unit.max_workers else eligible

    def check(self, units: list, workers: dict, where: str) -> None:
        """Refuse, before any task is submitted, units that require a GPU worker on a cluster with none.

        Raises:
            ConfigError: one line naming the units, the setting, the cluster and the two fixes.
        """
        if self.has_gpu:
            return
        needy = [u for u in units if explicit_gpu(u.device)]
        if not needy:
            return
        u = needy[0]
        more = f" (and {len(needy) - 1} more unit(s))" if len(needy) > 1 else ""
        raise ConfigError(f"{u.key}{more}: {u.stage}.device={u.device} needs a GPU worker, but none of the "
                          f"{len(workers)} worker(s) of {where} advertises the Dask resource {GPU}, so its tasks "
                          f"would wait forever; start GPU workers with `dask worker SCHEDULER --resources {GPU}=1` "
                          f"(and pass --scheduler), or set {u.stage}.device=cpu (or auto: GPU workers when there "
                          f"are any)")

