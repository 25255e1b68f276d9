"""Where work runs: Ray (a cluster when one is reachable, else local in-process) and the torch device."""

from __future__ import annotations

import logging
import os

from pipelines.core.cli import at_job_end

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster or start a local one.

    `address` (or RAY_ADDRESS, which `ray job submit` sets for the entrypoint) connects to a running cluster;
    without either a local Ray starts inside this process. Calling it twice is harmless. A job (`run_job`) that
    starts the session here also ends it, before its last line: Ray's forwarded logs never follow that line.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray in-process")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    at_job_end(ray.shutdown)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def torch_device(preferred: str | None = None) -> str:
    """`preferred` if given, else CUDA when present, else CPU."""
    if preferred:
        return preferred
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
