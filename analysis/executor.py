"""Where a study's runs and diagnostics execute: in this process, or as Ray tasks (local or a cluster).

    executor = make_executor("ray", address=None, cpus_per_run=1, gpus_per_run=0)
    results = executor.map(fn, [args, ...], desc="train")      # results in job order
    executor.stream([(priority, fn, args), ...], then=follow_ups)  # jobs that start other jobs as they finish

Every job is a plain function of plain arguments that writes its results to disk and is idempotent (a
finished job is skipped, an interrupted one resumes), so a retried or re-submitted job never redoes work.
The local Ray instance is started by the study itself with all of this machine's cores; `address` joins an
existing cluster instead ("auto", "HOST:PORT", or "ray://HOST:PORT" for Ray Client) — the same command then
fans out over every node. Multi-GPU training of one run stays on accelerate/torchrun; Ray only schedules runs.
"""
import heapq
import itertools
import os
import re
import socket
import time
from urllib.parse import urlparse

from tqdm.auto import tqdm

from adapters.errors import AdapterError

EXECUTORS = ("ray", "serial")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in Ray's messages


class _Executor:
    """The one job loop of both executors: jobs go out in priority order (lower first, then in the order added) as
    slots free up, and each finished job's follow-ups (`then`) join the queue at once, so no job waits for work it
    does not depend on. The executors differ only in how a job runs (`_submit`, `_next_done`) and how many run at
    once (`_slots`)."""

    timeline = ()  # (job name, hand-over, result, slots) of every job run so far, for busy()

    def stream(self, jobs, then=None, desc="jobs", progress=True, plan=None):
        """Run `jobs` ([(priority, fn, args)]) and the follow-ups `then(fn, args, result)` returns for each finished
        one (more such triples), until none is left. Returns every job's result, in the order the jobs were added.
        `plan` (a Plan): every job the work will run, known before it starts, so the progress bar's total is right
        from the first job and its ETA comes from the measured times of finished jobs of the same kind."""
        queue, results, order = [], {}, itertools.count()

        def add(items):
            for priority, fn, args in items:
                heapq.heappush(queue, (priority, next(order), fn, args))

        add(jobs)
        running, slots = {}, self._slots()
        began, self.timeline = {}, list(self.timeline)
        plan = plan or Plan({})
        with tqdm(total=max(len(queue), plan.total()), desc=desc, disable=not progress,
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") as bar:
            while queue or running:
                while queue and len(running) < slots:
                    _, i, fn, args = heapq.heappop(queue)
                    handle = self._submit(fn, args)
                    running[handle], began[handle] = (i, fn, args), time.perf_counter()
                handle, result = self._next_done(running, desc)
                i, fn, args = running.pop(handle)
                # a job is out only while a slot is free for it, so from its hand-over to its result it ran
                name = plan.kind(fn, args)
                self.timeline.append((name, began.pop(handle), time.perf_counter(), slots))
                results[i] = result
                more = list(then(fn, args, result)) if then is not None else []
                add(more)
                plan.done(name)
                bar.total = max(plan.total(), bar.n + 1 + len(queue) + len(running))
                eta = plan.eta(self.timeline, slots)
                if eta is not None:
                    seconds, untimed = eta
                    bar.set_postfix_str(f"ETA {'> ' if untimed else ''}{seconds / 60:.0f} min from the jobs' measured "
                                        f"times{' (not yet timed: ' + ', '.join(untimed) + ')' if untimed else ''}",
                                        refresh=False)
                bar.update(1)
        return [results[i] for i in sorted(results)]

    def map(self, fn, jobs, desc="jobs", progress=True):
        """fn(*args) for every args of `jobs`; results in job order."""
        return self.stream([(0, fn, args) for args in jobs], desc=desc, progress=progress)

    def busy(self):
        """How full the slots were over the jobs run so far: {jobs, slots, wall_s (first hand-over to last result),
        busy_s (the jobs' time summed), utilisation = busy_s / (slots · wall_s)}; {} before any job."""
        if not self.timeline:
            return {}
        slots = max(t[3] for t in self.timeline)
        wall = max(t[2] for t in self.timeline) - min(t[1] for t in self.timeline)
        busy = sum(t[2] - t[1] for t in self.timeline)
        return dict(jobs=len(self.timeline), slots=slots, wall_s=wall, busy_s=busy,
                    utilisation=busy / (slots * wall) if wall > 0 else 1.0)


class Plan:
    """The jobs a piece of work will run, by kind ({kind: count}; `kind(fn, args)` names a job's kind: the function's
    name unless `kinds` is given), for a progress bar whose total is known from the start and an ETA from measured
    times. `add(kind)` plans a job decided on later (an lr grid's extension)."""

    def __init__(self, planned, kinds=None):
        self.planned, self.finished, self.kinds = dict(planned), {}, kinds

    def kind(self, fn, args):
        return self.kinds(fn, args) if self.kinds else getattr(fn, "__name__", type(fn).__name__)

    def add(self, kind, n=1):
        self.planned[kind] = self.planned.get(kind, 0) + n

    def done(self, kind):
        self.finished[kind] = self.finished.get(kind, 0) + 1

    def total(self):
        return sum(self.planned.values())

    def eta(self, timeline, slots):
        """(seconds until the planned jobs are done, the families not yet timed): each kind's remaining jobs × the
        mean measured time of that kind's finished jobs (of its family, the part before ':', while none of the kind
        has finished), over the slots. A family none of whose jobs has finished is left out and named, so the
        seconds are then a lower bound (a diagnostic is not a training run: no time is borrowed across families).
        None before any job has finished."""
        took, family = {}, {}
        for name, start, end, _ in timeline:
            took.setdefault(name, []).append(end - start)
            family.setdefault(name.split(":")[0], []).append(end - start)
        if not took:
            return None
        left, untimed = 0.0, set()
        for kind, n in self.planned.items():
            remaining = max(0, n - self.finished.get(kind, 0))
            times = took.get(kind) or family.get(kind.split(":")[0])
            if remaining and times:
                left += remaining * sum(times) / len(times)
            elif remaining:
                untimed.add(kind.split(":")[0])
        return left / slots, sorted(untimed)


class SerialExecutor(_Executor):
    """Jobs one after the other in this process (debugging; exceptions surface with their traceback)."""

    name = "serial"

    def _slots(self):
        return 1

    def _submit(self, fn, args):
        return object()  # runs when asked for: one at a time, in queue order

    def _next_done(self, running, desc):
        handle, (_, fn, args) = next(iter(running.items()))
        return handle, fn(*args)

    def settings(self):
        return dict(executor=self.name, **self.busy())

    def close(self):
        pass


class RayExecutor(_Executor):
    """Each job a Ray task with declared resources; Ray retries a task whose worker died (OOM, lost node). As many
    tasks are out as the cluster has slots (its CPUs, and GPUs, over a job's share), so the queue's priorities hold."""

    name = "ray"

    def __init__(self, address=None, cpus_per_run=1, gpus_per_run=0, max_retries=2):
        import ray
        if address not in (None, "auto"):
            _check_reachable(address)
        self.ray, self.address = ray, address
        self.resources = dict(num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        self.max_retries = max_retries
        self._remotes = {}
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

    def _slots(self):
        cluster = self.ray.cluster_resources()
        fits = [cluster.get(key, 0) / want for key, want in (("CPU", self.resources["num_cpus"]),
                                                             ("GPU", self.resources["num_gpus"])) if want]
        return max(1, int(min(fits)))

    def _submit(self, fn, args):
        if fn not in self._remotes:
            self._remotes[fn] = self.ray.remote(max_retries=self.max_retries, **self.resources)(fn)
        return self._remotes[fn].remote(*args)

    def _next_done(self, running, desc):
        (ref,), _ = self.ray.wait(list(running), num_returns=1)
        try:
            return ref, self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            raise task_error(e, desc) from None

    def settings(self):
        cluster = self.ray.cluster_resources()
        return dict(executor=self.name, address=self.address or "local", cluster_cpus=cluster.get("CPU", 0),
                    cluster_gpus=cluster.get("GPU", 0), cpus_per_run=self.resources["num_cpus"],
                    gpus_per_run=self.resources["num_gpus"], max_retries=self.max_retries, **self.busy())

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
