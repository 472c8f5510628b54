"""Where units run on a cluster of CPU and GPU workers (pipelines.placement): pure functions of
scheduler_info's workers, no cluster. The real thing, on loopback workers: tests/test_distributed.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from giblet.errors import ConfigError
from pipelines.placement import GPU, Placement, gpu_workers


def workers(*gpus: float) -> dict:
    """scheduler_info()["workers"]: worker i advertises GPU=gpus[i] (0: no resource at all)."""
    return {f"tcp://127.0.0.1:{9000 + i}": {"resources": {GPU: g} if g else {}} for i, g in enumerate(gpus)}


def unit(device=None, max_workers=None, stage="audio", key="audio/run-1"):
    return SimpleNamespace(device=device, max_workers=max_workers, stage=stage, key=key)


MIXED = workers(0, 1, 0, 2)  # :9001 and :9003 are GPU workers


def test_gpu_units_request_the_resource_and_cpu_units_stay_off_gpu_workers():
    p = Placement(MIXED)
    assert gpu_workers(MIXED) == ["tcp://127.0.0.1:9001", "tcp://127.0.0.1:9003"]
    for device in ("cuda", "cuda:1", "auto"):  # auto: the cluster has GPU workers
        assert p.resources(unit(device)) == {"resources": {GPU: 1}}
        assert p.pool(unit(device), MIXED) == gpu_workers(MIXED)
        assert p.pool(unit(device, max_workers=1), MIXED) == ["tcp://127.0.0.1:9001"]
        assert p.restricted(unit(device, max_workers=1)) and not p.restricted(unit(device))
    for device in ("cpu", None):  # fMRI and video have no device
        assert p.resources(unit(device)) == {} and p.restricted(unit(device))
        assert p.pool(unit(device), MIXED) == ["tcp://127.0.0.1:9000", "tcp://127.0.0.1:9002"]
    # the CPU workers all left: CPU work may use the GPU workers rather than wait forever
    assert p.pool(unit(None), workers(0, 1)) == ["tcp://127.0.0.1:9000"]
    assert p.pool(unit(None), {"tcp://127.0.0.1:9001": MIXED["tcp://127.0.0.1:9001"]}) == ["tcp://127.0.0.1:9001"]


def test_without_gpu_workers_auto_runs_anywhere_and_with_only_gpu_workers_cpu_work_too():
    cpu_only, gpu_only = workers(0, 0), workers(1, 1)
    p = Placement(cpu_only)
    assert p.resources(unit("auto")) == {} and not p.restricted(unit("auto")) and not p.restricted(unit(None))
    p.check([unit("auto"), unit("cpu"), unit(None)], cpu_only, "the cluster")  # nothing needs a GPU
    q = Placement(gpu_only)
    assert q.resources(unit("auto")) == {"resources": {GPU: 1}}
    assert not q.restricted(unit(None)) and q.resources(unit(None)) == {}


def test_cuda_without_gpu_workers_fails_up_front_in_one_line_naming_the_fix():
    units = [unit("cuda"), unit("cuda", key="audio/run-2"), unit("auto", stage="text", key="text/run-1")]
    with pytest.raises(ConfigError) as err:
        Placement(workers(0, 0)).check(units, workers(0, 0), "the cluster at tcp://h:8786")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("audio/run-1 (and 1 more unit(s)): audio.device=cuda needs a GPU")
    assert "2 worker(s) of the cluster at tcp://h:8786" in msg and "--resources GPU=1" in msg
    assert "audio.device=cpu" in msg
    Placement(MIXED).check(units, MIXED, "the cluster")  # GPU workers: fine


@pytest.mark.timeout(300)  # without the up-front check its tasks would wait for a GPU worker forever
def test_a_cuda_stage_on_a_localcluster_without_gpus_fails_before_any_task(tmp_path):
    """This machine has no CUDA device, so its LocalCluster advertises no GPU: audio.device=cuda
    is refused once the cluster is up, in one line, and no unit is committed."""
    from giblet.config import load_config
    from giblet.store import read_manifest
    from giblet.synth import make_study
    from pipelines import engine

    study = make_study(tmp_path, n_subjects=1, n_trs=4, shape=(6, 6, 4), fps=5, movie_size=(32, 18), seed=2,
                       annotations=False, stages={"audio": {"model": "random"}})
    with pytest.raises(ConfigError, match=r"^audio/run-1: audio.device=cuda needs a GPU worker, but none of the 1 "
                                          r"worker\(s\) of the LocalCluster \(no CUDA device"):
        engine.run(load_config(study, ["audio.device=cuda"]), only=["audio"], workers=1, progress=False)
    assert not (read_manifest(tmp_path / "study.zarr") or {}).get("units")  # nothing committed
