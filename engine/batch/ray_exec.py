"""`engine batch --ray`: one Ray task per job, on a local Ray instance or an existing cluster.

Each worker process renders with :func:`engine.batch.job.run_job` (models cached in that process) and writes the
mp4 itself, so inputs and the output folder must be paths every node sees. Ray is an optional extra, imported only
when a batch runs with ``--ray``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Dict, Sequence, Tuple, TypeVar

from engine.batch.job import JobPayload, run_job
from engine.extras import install_hint
from engine.options import CLIError

log = logging.getLogger(__name__)
Key = TypeVar("Key")  # what the caller knows a job by (handed back with its outcome)


def _ray_task(p: JobPayload) -> Dict[str, Any]:
    """The Ray task body: one job in a worker process (models cached in that process)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_job(p)


def _ray_connect(address: str, num_cpus: int) -> bool:
    """Connect to (or, for "auto", start) Ray; True when this call started it (so the batch shuts it down)."""
    try:
        import ray
    except ImportError as e:
        raise CLIError(f"--ray needs the ray extra ({e}): {install_hint('ray')}") from e
    if ray.is_initialized():
        return False
    try:
        if address == "auto":  # a new local instance on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:  # an existing cluster: "HOST:6379" or "ray://HOST:10001"
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise CLIError(f"--ray {address}: cannot start or reach a Ray cluster ({e})") from e
    return True


def run_on_ray(jobs: Sequence[Tuple[Key, JobPayload]], done: Callable[[Key, Dict[str, Any]], None], args) -> None:
    """Render ``jobs`` (key, payload) as Ray tasks with the --ray flags of ``args``; ``done(key, outcome)`` as each
    one ends (a task that died is an error outcome). Ctrl-C / SIGTERM cancels the tasks still pending. A worker's
    torch threads: --threads, else its CPU share (Ray sets OMP_NUM_THREADS alike)."""
    started = _ray_connect(args.ray, args.ray_num_cpus)  # CLIError naming the ray extra when Ray is missing
    import ray

    try:
        # max_retries: a crashed worker (node lost, OOM kill) is retried; a Python error is reported, not retried
        task = ray.remote(_ray_task).options(num_cpus=args.cpus_per_job, num_gpus=args.gpus_per_job, max_retries=2,
                                             name="mmgt-batch-job")
        have = ray.cluster_resources()
        if args.gpus_per_job > have.get("GPU", 0) or args.cpus_per_job > have.get("CPU", 0):
            log.warning("no node of the Ray cluster offers %g GPU(s) and %g CPU(s) now (cluster total: %g GPU, "
                        "%g CPU); the jobs wait until one joins", args.gpus_per_job, args.cpus_per_job,
                        have.get("GPU", 0), have.get("CPU", 0))
        threads = args.threads or max(1, int(args.cpus_per_job))
        refs = {task.remote(dataclasses.replace(payload, threads=threads)): key for key, payload in jobs}
        log.info("submitted %d jobs to Ray (%s)", len(refs), args.ray)
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the task died (not a job error: those are returned)
                        outcome = {"status": "error", "error": f"Ray task failed: {e}"}
                    done(refs[ref], outcome)
        except KeyboardInterrupt:
            # a cancelled task gets KeyboardInterrupt in its worker: the runner discards its temp mp4
            for ref in pending:
                ray.cancel(ref)
            with contextlib.suppress(Exception):
                ray.wait(pending, num_returns=len(pending), timeout=30)
            raise
    finally:
        if started:
            ray.shutdown()


__all__ = ["run_on_ray"]
