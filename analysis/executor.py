"""Where a study's runs and diagnostics execute: in this process, or as Ray tasks (local or a cluster).

    executor = make_executor("ray", address=None, cpus_per_run=1, gpus_per_run=0)
    results = executor.map(fn, [args, ...], desc="train")      # results in job order

Every job is a plain function of plain arguments that writes its results to disk and is idempotent (a
finished job is skipped, an interrupted one resumes), so a retried or re-submitted job never redoes work.
The local Ray instance is started by the study itself with all of this machine's cores; `address` joins an
existing cluster instead ("auto", "HOST:PORT", or "ray://HOST:PORT" for Ray Client) — the same command then
fans out over every node. Multi-GPU training of one run stays on accelerate/torchrun; Ray only schedules runs.
"""
import os
import re
import socket
from urllib.parse import urlparse

from tqdm.auto import tqdm

from adapters.errors import AdapterError

EXECUTORS = ("ray", "serial")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in Ray's messages


class SerialExecutor:
    """Jobs one after the other in this process (debugging; exceptions surface with their traceback)."""

    name = "serial"

    def map(self, fn, jobs, desc="jobs", progress=True):
        return [fn(*args) for args in tqdm(jobs, desc=desc, disable=not progress)]

    def settings(self):
        return dict(executor=self.name)

    def close(self):
        pass


class RayExecutor:
    """Each job a Ray task with declared resources; Ray retries a task whose worker died (OOM, lost node)."""

    name = "ray"

    def __init__(self, address=None, cpus_per_run=1, gpus_per_run=0, max_retries=2):
        import ray
        if address not in (None, "auto"):
            _check_reachable(address)
        self.ray, self.address = ray, address
        self.resources = dict(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        self.max_retries = max_retries
        if not ray.is_initialized():
            # Quiet local start: no dashboard, workers' logs stay in Ray's session directory.
            kwargs = dict(address=address) if address else dict(num_cpus=os.cpu_count(), include_dashboard=False)
            try:
                ray.init(log_to_driver=False, configure_logging=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise AdapterError(f"cannot start or join Ray at {address or 'a local instance'}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._started = True
        else:
            self._started = False

    def map(self, fn, jobs, desc="jobs", progress=True):
        remote = self.ray.remote(max_retries=self.max_retries, **self.resources)(fn)
        refs = [remote.remote(*args) for args in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        with tqdm(total=len(refs), desc=desc, disable=not progress) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        results[index[ref]] = self.ray.get(ref)
                    except self.ray.exceptions.RayTaskError as e:
                        raise task_error(e, desc) from None
                    bar.update(1)
        return results

    def settings(self):
        cluster = self.ray.cluster_resources()
        return dict(executor=self.name, address=self.address or "local", cluster_cpus=cluster.get("CPU", 0),
                    cluster_gpus=cluster.get("GPU", 0), cpus_per_run=self.resources["num_cpus"],
                    gpus_per_run=self.resources["num_gpus"], max_retries=self.max_retries)

    def close(self):
        if self._started:
            self.ray.shutdown()


def task_error(error, desc="jobs"):
    """The error a Ray task raised, as the user should see it: the task's own AdapterError as it is (one line from
    the CLI), anything else as an AdapterError of its first line. Ray's wrapper (the remote traceback, terminal
    colour codes) stays out; `--executor serial` shows the traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, AdapterError):
        return cause
    text = ANSI.sub("", str(cause if cause is not None else error)).strip()
    name = type(cause).__name__ if cause is not None else type(error).__name__
    first = next((line for line in text.splitlines() if line.strip()), "")
    return AdapterError(f"a {desc} task failed: {name}: {first.strip()} (rerun with --executor serial for its "
                        "traceback)")


def _check_reachable(address, timeout=5.0):
    """Fail in seconds, not after Ray's long connection retries, when nothing listens at HOST:PORT."""
    url = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise AdapterError(f"--address must be 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise AdapterError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def make_executor(name="ray", *, address=None, cpus_per_run=1, gpus_per_run=0):
    if name not in EXECUTORS:
        raise AdapterError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    if name == "serial":
        if address:
            raise AdapterError("--address needs the ray executor")
        return SerialExecutor()
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise AdapterError(f"cpus per run must be > 0 and gpus per run >= 0, got {cpus_per_run}, {gpus_per_run}")
    return RayExecutor(address, cpus_per_run, gpus_per_run)
