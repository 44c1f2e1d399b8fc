"""The one way every job starts or joins Ray.

    start_or_join()                      a new local cluster inside this process, sized to this machine
    start_or_join("ray-head:6379")       join that cluster (`--address`; "auto" finds a running one)

Without an address a job always starts its own cluster (ray.init(address="local")): a cluster already
running on this machine, RAY_ADDRESS, or the address file a crashed cluster left in /tmp/ray are ignored, so
`ssm train` never joins someone else's cluster by accident nor fails on a stale address. The one exception
is a job submitted through Ray's job API (`ssm submit`): its driver runs on the cluster and joins it.
"""

from __future__ import annotations

import os

from jobs.console import quiet_ray_data, ray_init_kwargs

# Set by Ray's job supervisor in the environment of every submitted job's driver.
_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job() -> bool:
    """True in the driver of a job submitted through Ray's job API (it runs on the cluster it belongs to)."""
    return _SUBMITTED_JOB_ENV in os.environ


def start_or_join(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                  object_store_mb: int | None = None) -> bool:
    """Join the cluster at `address`, or start a local one; True when this call did it (so the caller shuts it
    down), False when this process already had Ray running.

    num_cpus, num_gpus and object_store_mb size a local cluster only (a joined one has its own size);
    num_cpus defaults to this machine's cores.
    """
    import ray

    if ray.is_initialized():
        quiet_ray_data()
        return False
    if address is None and submitted_job():
        address = "auto"
    if address:
        ray.init(address=address, **ray_init_kwargs())
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            num_gpus=num_gpus,
            object_store_memory=None if object_store_mb is None else object_store_mb << 20,
            include_dashboard=False,
            **ray_init_kwargs(),
        )
    quiet_ray_data()
    return True

