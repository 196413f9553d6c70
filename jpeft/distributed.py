"""Multi-process (multi-host) training on top of ``jax.distributed``.

Every process runs the same program. The pattern::

    info = jpeft.distributed.initialize()            # TPU pods / SLURM: detected; else pass the coordinator
    mesh = jpeft.make_mesh(fsdp=4)                   # spans the devices of *all* processes
    rows = jpeft.distributed.process_slice(global_batch_size)
    batch = jpeft.distributed.global_batch(local_rows_of_this_process, mesh)
    adapter, opt_state, m = step(params, adapter, opt_state, batch, key)
    jpeft.distributed.log("step", i, float(m["loss"]))  # printed by process 0 only
    host = jpeft.distributed.gather(adapter)           # numpy on every process
    if jpeft.distributed.is_main_process(): save(host)

JAX is the distributed runtime; this module only adds the bookkeeping around it: joining the
job (and choosing CPU collectives), which rows of the global batch each process loads, the
assembly of global arrays from per-process shards
(``jax.make_array_from_process_local_data``), gathering results to the host, and writing or
logging from process 0 only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import os
import signal
import sys
import threading
import time
import zlib
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpeft.errors import DistributedError, InputValidationError
from jpeft.parallel import batch_entry
from jpeft.tree import host_array

__all__ = [
    "initialize",
    "shutdown",
    "is_main_process",
    "process_index",
    "process_count",
    "process_slice",
    "host_local_batch",
    "global_batch",
    "gather",
    "gather_array",
    "barrier",
    "allgather",
    "log",
    "on_main_process",
    "watch_for_failures",
    "lost_peer",
    "another_process_failed",
    "claim_exit",
    "leave_job_now",
]

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    local_device_ids: Optional[Sequence[int]] = None,
    cpu_collectives: Optional[str] = "gloo",
    initialization_timeout: int = 300,
    auto: Optional[bool] = None,
    fail_together: bool = True,
    on_join_timeout: Optional[Callable[[str], int]] = None,
) -> dict:
    """Joins this process to the job with ``jax.distributed.initialize``; returns
    ``{"process_index", "process_count", "local_devices", "global_devices"}``.

    Call it before any other JAX work. With no arguments, on a TPU VM pod slice or under
    SLURM / Open MPI (``auto``: detected from the environment) JAX finds the coordinator by
    itself; elsewhere a run with no coordinator is a single-process run and nothing is
    joined. Calling it again once joined joins nothing more.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: number of processes in the job.
      process_id: this process's index, ``0 .. num_processes - 1``.
      local_device_ids: restrict this process to some local devices (e.g. one GPU each).
      cpu_collectives: the CPU collectives library (``jax_cpu_collectives_implementation``,
        ``"gloo"`` or ``"mpi"``) so CPU-only processes can run cross-process collectives;
        ``None`` leaves the setting alone.
      initialization_timeout: seconds to wait for every process to join.
      auto: force (``True``) or forbid (``False``) JAX's cluster auto-detection when no
        coordinator is given; default: detect from the environment.
      fail_together: when one process of the job ends with an exception it does not catch
        (a write failing on process 0 in :func:`on_main_process`, a bad batch on one host in
        :func:`jpeft.fit`, Ctrl-C), it prints its traceback as Python does, tells the other
        processes and ends at once; each of them ends within seconds with one
        ``jpeft.errors.DistributedError`` line naming it, exit status 1
        (:func:`watch_for_failures`). Without this the others wait for it in the next
        collective operation or barrier until JAX aborts them (minutes, a C++ stack), while it
        waits for them in ``jax.distributed``'s shutdown. An error at an interactive prompt
        (``python``, ``python -i``, ``code.interact``) ends no process: it is printed and the
        prompt goes on, as without this. ``False`` leaves Python's and JAX's behaviour as it is.
      on_join_timeout: when not every process has joined after ``initialization_timeout``
        seconds (one was never started or stopped before joining, two were given the same
        ``process_id``, or the coordinator address is wrong on some), JAX's client aborts the
        process with a C++ stack (SIGABRT, status 134) a few seconds later, which no Python
        code can catch. Just before, this process calls ``on_join_timeout(message)`` (which
        prints the message and returns the exit status) and ends with that status; the default
        prints one ``jpeft.errors.DistributedError`` line and ends with status 1. The same report
        ends a process that JAX's client aborts *during* the join (SIGABRT from its C++ code, on
        Linux): two processes given the same ``process_id`` register at once and the coordination
        service refuses one (``ALREADY_EXISTS ... newer incarnation``); JAX's own lines (its reason
        and a C++ stack) come first, then the one line saying which process id to start once.

    Raises:
      DistributedError: when only some of ``coordinator_address``, ``num_processes`` and
        ``process_id`` are given, or joining fails (the message has JAX's reason).
    """
    if jax.distributed.is_initialized():
        if fail_together:  # joined by jax.distributed.initialize itself: the protection still applies
            _end_together()
        return _info()
    explicit = (coordinator_address, num_processes, process_id)
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise DistributedError(
            f"initialize: with coordinator_address={coordinator_address!r} also give num_processes and process_id "
            f"(found num_processes={num_processes!r}, process_id={process_id!r}); every process needs all three, "
            "with process 0 on the coordinator host."
        )
    if coordinator_address is None and (num_processes not in (None, 1) or process_id not in (None, 0)):
        raise DistributedError(
            f"initialize: num_processes={num_processes!r} / process_id={process_id!r} need a coordinator_address "
            "('host:port' of process 0), e.g. initialize('10.0.0.2:1234', 2, 0)."
        )
    if auto is None:
        auto = any(k in os.environ for k in _CLUSTER_ENV)
    if coordinator_address is None and not auto:
        return _info()  # single process: nothing to join
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kw = dict(initialization_timeout=initialization_timeout)
    if local_device_ids is not None:
        kw["local_device_ids"] = local_device_ids
    report = on_join_timeout or _print_failure
    watchdog = _join_watchdog(explicit, initialization_timeout, report)
    try:
        with _abort_reported(explicit, report):
            if coordinator_address is None:
                jax.distributed.initialize(**kw)
            else:
                jax.distributed.initialize(coordinator_address, num_processes, process_id, **kw)
    except Exception as e:  # JAX raises RuntimeError / ValueError / XlaRuntimeError
        if coordinator_address is None and not any(k in os.environ for k in _CLUSTER_ENV):
            raise DistributedError(
                f"cluster auto-detection found no cluster: none of {list(_CLUSTER_ENV)} is set (a TPU VM pod slice, "
                "SLURM or Open MPI sets them), and JAX could not find a coordinator ({e}). Outside such a cluster give "
                "coordinator_address, num_processes and process_id (jpeft train: --coordinator HOST:PORT "
                "--num-processes N --process-id I)."
            ) from e
        raise DistributedError(
            f"jax.distributed.initialize failed for coordinator={explicit[0]!r}, num_processes={explicit[1]!r}, "
            f"process_id={explicit[2]!r}: {str(e).rstrip('.')}. Check that every process uses the same coordinator address and "
            "count, that process 0 runs on the coordinator host, and that the port is open."
        ) from e
    finally:
        watchdog.cancel()
    if fail_together:
        _end_together()
    return _info()


# JAX's client gives up registering at its initialization_timeout and aborts the process about 5 s later (measured
# with jax 0.10.2 on the CPU: 20 s after the call for a timeout of 15 s, imports excluded); the watchdog ends it first
_JOIN_GRACE_S = 1.0


def _join_watchdog(explicit, timeout: float, report: Callable[[str], int]) -> threading.Timer:
    """A started timer that ends this process with ``report``'s line and status once
    ``jax.distributed.initialize`` has waited past its ``timeout`` for the other processes
    (cancelled when it returns or raises): otherwise JAX's client aborts it with a C++ stack
    and a message that names neither the cause nor the fix."""
    address, n, me = explicit

    def fire():
        who = (f"process {me} of {n}, coordinator {address}" if address is not None else
               "its coordinator found by cluster auto-detection")
        message = (f"not every process of this job joined it within initialization_timeout = {timeout:g} s ({who}): "
                   "a process was not started, or stopped before joining (see its output), or two were given the "
                   "same process id, or some process was given another coordinator address or port. Start each "
                   "process id once, every one with process 0's host:port; this process stops.")
        try:
            status = report(message)
        finally:
            sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(timeout + _JOIN_GRACE_S, fire)
    timer.daemon = True
    timer.start()
    return timer


def _abort_message(explicit) -> str:
    address, n, me = explicit
    who = (f"process {me} of {n}, coordinator {address}" if address is not None else
           "its coordinator found by cluster auto-detection")
    same = f"process id {me}" if me is not None else "its process id"
    return (f"JAX's distributed client aborted this process while it joined the job ({who}; JAX's reason is the "
            f"'Terminating process' line above). 'ALREADY_EXISTS ... newer incarnation' (or a RegisterTask deadline "
            f"before the join timeout) there means that another process was started with the same {same} "
            "(jpeft train: --process-id): give every process its own id, 0 to num_processes - 1, each started once, "
            "then start the job again.")


class _SigAction(ctypes.Structure):
    """An opaque ``struct sigaction`` (152 bytes with x86-64 glibc; room to spare): saved
    and restored as it is, never read."""
    _fields_ = [("raw", ctypes.c_char * 256)]


@contextlib.contextmanager
def _abort_reported(explicit, report: Callable[[str], int]):
    """While ``jax.distributed.initialize`` joins: a SIGABRT (JAX's client ending the process with
    ``LOG(FATAL)``, which no Python code can catch: two processes registered with the same process
    id) ends this process with ``report``'s line and status after JAX's own lines, instead of a C++
    stack alone and status 134. A C-level handler (through ``ctypes``; Python's own ``signal``
    handlers run only between bytecodes, after ``abort`` has killed the process), on Linux only, in
    the main thread; the previous handler is restored (``sigaction``, flags included) after the join."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield
        return
    message = _abort_message(explicit)

    def on_abort(_signum):  # runs in the aborting thread (the join's, holding no Python state half-changed)
        try:
            status = report(message)
        finally:
            sys.stderr.flush()
        os._exit(status)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
        old = _SigAction()
        libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        if libc.sigaction(signal.SIGABRT, None, ctypes.byref(old)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction")
        libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
    except (OSError, AttributeError):  # no C library to reach: JAX's abort stays as it is
        yield
        return
    try:
        yield
    finally:
        libc.sigaction(signal.SIGABRT, ctypes.byref(old), None)


def _info() -> dict:
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
    }


def shutdown() -> None:
    """Leaves the job (``jax.distributed.shutdown``); a no-op in a single-process run."""
    if jax.distributed.is_initialized():
        if _watch is not None:  # its blocking read would outlive the coordination service
            _watch.close()
        jax.distributed.shutdown()


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that logs and writes."""
    return jax.process_index() == 0


def log(*args, file=None, **kwargs) -> None:
    """``print`` on process 0 only (flushed), so a pod's log shows each line once."""
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def on_main_process(fn: Callable, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` on process 0 only, then waits for every process (so no
    process reads a file before it is written). Returns ``fn``'s result on process 0 and
    ``None`` elsewhere."""
    out = fn(*args, **kwargs) if is_main_process() else None
    barrier(f"jpeft_on_main_{getattr(fn, '__name__', 'fn')}")
    return out


def barrier(name: str = "jpeft_barrier") -> None:
    """Waits until every process reaches this point (no-op with one process).

    Raises:
      DistributedError: the processes reached barriers of different names."""
    if jax.process_count() > 1:
        names = allgather(np.uint32(zlib.crc32(name.encode())))
        if len(set(names.tolist())) > 1:
            raise DistributedError(f"the processes of this job reached different barriers (this one: {name!r}); "
                                   "every process must run the same steps.")


def allgather(x) -> np.ndarray:
    """Every process's host value ``x`` (the same shape and dtype on each), stacked on a new
    leading axis, on every process: ``multihost_utils.process_allgather(x)``, returned once
    every device of this process has finished its part of the gather. JAX's returns as soon as
    the first device holds the result, while another device of the same process may still be
    connecting to, or exchanging with, the other processes; a process that then ends (a refusal
    every process raises at once) closed its end under them, and the other process printed
    gloo's "failed to connect ... Connection refused" lines after its own error. Here each
    process has finished all of its exchanges before it goes on, so processes that stop
    together leave nothing in flight."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
    mesh = Mesh(devices, ("processes", "local_devices"))
    mine = x[None]
    spread = jax.make_array_from_single_device_arrays(
        (jax.process_count(),) + x.shape, NamedSharding(mesh, P("processes")),
        [jax.device_put(mine, d) for d in jax.local_devices()])
    return host_array(_replicate(NamedSharding(mesh, P()))(spread))


@functools.lru_cache(maxsize=None)
def _replicate(sharding):
    """The identity, its result replicated on ``sharding``'s devices (one program per mesh)."""
    return jax.jit(lambda a: a, out_shardings=sharding)


def process_slice(global_size: int, *, index: Optional[int] = None, count: Optional[int] = None) -> slice:
    """The rows of a global batch that this process loads: an equal contiguous block.

    >>> import jpeft.distributed as d
    >>> d.process_slice(8, index=1, count=2)
    slice(4, 8, None)
    """
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if global_size % count:
        raise InputValidationError(
            f"the global batch of {global_size} rows cannot be split evenly over {count} processes; use a global "
            f"batch size that is a multiple of {count}."
        )
    per = global_size // count
    return slice(index * per, (index + 1) * per)


def host_local_batch(batch, *, index: Optional[int] = None, count: Optional[int] = None):
    """This process's rows (:func:`process_slice`) of a global host batch that every process
    can compute (e.g. from a shared seed); a loader that reads only its own shard can skip
    this and pass its rows to :func:`global_batch` directly."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return batch
    sl = process_slice(int(np.shape(leaves[0])[0]), index=index, count=count)
    return jax.tree.map(lambda x: np.asarray(x)[sl], batch)


def global_batch(local_batch, mesh: Mesh, batch_axes=("data", "fsdp")):
    """One global ``jax.Array`` per leaf from every process's rows
    (``jax.make_array_from_process_local_data``): the first axis is split over the mesh axes
    ``batch_axes``, each process contributing the rows it holds, in process order. In a
    single-process run this equals :func:`jpeft.shard_batch`."""
    sharding = NamedSharding(mesh, P(batch_entry(mesh, batch_axes)))
    n_proc = jax.process_count()

    def make(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise InputValidationError(
                "global_batch: every batch leaf needs a leading batch axis; found a scalar. Put per-step "
                "constants in the loss function instead."
            )
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])

    return jax.tree.map(make, local_batch)


def gather(tree):
    """Every leaf as a host ``numpy`` array with its full global value, on every process
    (:func:`gather_array` of each leaf). The whole tree is then on the host of every process:
    to write a large one (a fully fine-tuned model), pass ``gather=gather_array`` to
    :func:`jpeft.save_adapter` instead, which holds one array at a time."""
    return jax.tree.map(gather_array, tree)


def gather_array(x) -> np.ndarray:
    """The full global value of one array as a host ``numpy`` array, on every process
    (for an array spread over processes, a collective every process takes part in, returned once
    every device of this process has finished its part, as :func:`allgather`: the job's last
    gather, of the final adapter, is followed by the processes' exit; a local copy otherwise)."""
    from jax.experimental import multihost_utils

    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return host_array(x)
    if isinstance(x.sharding, NamedSharding):
        return host_array(_replicate(NamedSharding(x.sharding.mesh, P()))(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # reads the first local device's copy


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is an operation across the processes of a job that failed because another
    process left it (killed, crashed, or ended by an error of its own): JAX's gloo collectives
    report the closed connection (a ``JaxRuntimeError``, or the ``ValueError`` Orbax wraps it in),
    the coordination service a peer it cannot reach. Such an error says nothing about this
    process's own data or files."""
    text = str(e)
    return jax.process_count() > 1 and any(s in text for s in ("Gloo", "Connection closed by peer", "UNAVAILABLE"))


def coordination_client():
    """The client of JAX's coordination service (its key-value store) when this process is one of
    several started through ``jax.distributed``, else ``None``. JAX 0.10 has no public accessor:
    read from ``jax._src.distributed.global_state``, as Orbax reads it (the one JAX-internal name
    jpeft uses; docs/ARCHITECTURE.md)."""
    from jax._src import distributed as _jd

    state = _jd.global_state
    return state.client if state.client is not None and state.num_processes > 1 else None


class StopAgreement:
    """Makes every process of a job stop after the same step when a signal (Ctrl-C, SIGTERM)
    reached some of them (:func:`jpeft.fit`'s interrupt handling; one per ``fit`` call).

    A process left alone to stop would leave the others waiting in the next step's collectives.
    Through JAX's coordination service (its key-value store): a signalled process announces the
    stop; a helper thread on every process waits for that announcement in a blocking read, so a
    step costs nothing until it comes (no round trip, no collective). Each process then publishes
    the number of steps it has done and keeps training; once all have published, they stop after
    step ``max + 1``. Processes run in lockstep (every step's collectives need all of them), so
    when the last one publishes ``m`` none has gone past step ``m + 1``. Without a coordination
    client (a job not started through ``jax.distributed``) the flag is gathered every step
    instead (``multihost_utils.process_allgather``)."""

    _calls = itertools.count()  # every process runs the same program: the n-th fit call of each

    def __init__(self):
        self._client = coordination_client()
        self._prefix = f"jpeft_stop/{next(self._calls)}"
        self._remote = threading.Event()
        self._active = True
        self._published = False
        self._target: Optional[int] = None
        self._thread = None
        if self._client is not None:
            self._thread = threading.Thread(target=self._watch, name="jpeft-stop-agreement", daemon=True)
            self._thread.start()

    def _watch(self):
        while self._active:
            try:
                why = self._client.blocking_key_value_get(f"{self._prefix}/why", 2000)
            except Exception as e:  # noqa: BLE001 (JaxRuntimeError): a timeout, or the service went away
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                return
            if why == "signal":
                self._remote.set()
            return

    def _set(self, key: str, value: str) -> None:
        try:
            self._client.key_value_set(f"{self._prefix}/{key}", value)
        except Exception as e:  # noqa: BLE001: another process wrote it first
            if "ALREADY_EXISTS" not in str(e):
                raise

    def stop_now(self, step: int, hit: bool) -> bool:
        """Whether to stop before the next step, ``step`` steps done; ``hit``: this process got a signal."""
        if self._client is None:
            return bool(np.any(allgather(np.int32(hit))))
        if self._target is not None:
            return step >= self._target
        if not (hit or self._remote.is_set()):
            return False
        if not self._published:
            if hit:
                self._set("why", "signal")
            self._set(f"at/{jax.process_index()}", str(int(step)))
            self._published = True
        done = self._client.key_value_dir_get(f"{self._prefix}/at/")
        if len(done) < jax.process_count():
            return False
        self._target = max(int(v) for _, v in done) + 1
        if not hit and jax.process_index() == 0:
            print(f"jpeft: another process of this job got a signal: saving a checkpoint at step {self._target}, "
                  "then stopping", file=sys.stderr)
        return step >= self._target

    def close(self) -> None:
        """Ends the helper thread (wakes every process's: this fit call's loop is over)."""
        self._active = False
        if self._thread is not None:
            try:
                self._set("why", "done")
            except Exception:  # noqa: BLE001: the service went away; the thread's read times out
                pass
            self._thread.join(timeout=5)


# a process of a job that stops with an error it does not share (a failed write on process 0, a bad batch on one
# host) says why under this key of the coordination service (the first one to stop wins); every process that ends
# by leave_job_now marks itself under the folder
_FAILED_KEY = "jpeft_failed"
_LEFT_DIR = "jpeft_left/"
_GRACE_S = 3.0  # how long another process's failure leaves this one to end by an error of its own first
_LEAVE_WAIT_S = _GRACE_S + 5  # how long process 0 (the coordination service's host) waits for the others to leave
# then how long it still waits: another process marks itself as left just before it ends, and its
# client, still polling the service, aborts it with JAX's C++ "Terminating process" report (lines
# after its one-line error) if the service ends in between (seen once in ~40 runs on a loaded host)
_LAST_OUT_S = 0.5


class _FailureWatch:
    """The helper thread of :func:`watch_for_failures` and the one-way switch that decides
    which of the main thread's own error and another process's failure ends this process."""

    def __init__(self, client, report: Callable[[str], int]):
        self.client, self.report = client, report
        self.lock = threading.Lock()
        self.ending = False  # this process is ending (claimed by the main thread or the helper)
        self.note: Optional[str] = None  # another process's failure, once seen
        self.active = True
        self.thread = threading.Thread(target=self._watch, name="jpeft-failure-watch", daemon=True)
        self.thread.start()
        atexit.register(self.close)  # before JAX's own atexit shutdown (atexit runs newest first)

    def claim(self) -> bool:
        """Whether this caller is the first to end this process (the other waits for it)."""
        with self.lock:
            first, self.ending = not self.ending, True
            return first

    def _watch(self):
        while self.active:
            try:
                note = self.client.blocking_key_value_get(_FAILED_KEY, 1000)
            except Exception as e:  # noqa: BLE001 (JaxRuntimeError): a timeout, or the service went away
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                return
            if note == "done" or not self.active:
                return
            who, _, why = note.partition("\t")
            if who == str(jax.process_index()):
                return  # this process's own note: its main thread is ending it
            self.note = (f"process {who} of this job stopped: {why}; this process stops too (it would wait for "
                         f"process {who} in the job's next collective operation, for minutes). See process {who}'s "
                         "output, fix the cause and start every process again (jpeft train: with --resume to continue "
                         "from the last checkpoint).")
            # an error every process raises (a refused setting) ends each by its own message: give it a moment
            time.sleep(_GRACE_S)
            if not self.claim():
                return
            leave_job_now(self.report(self.note))
            return

    def close(self) -> None:
        """Ends the helper thread (this process exits normally: the job's work is over)."""
        if not self.active:
            return
        self.active = False
        try:
            self.client.key_value_set(_FAILED_KEY, "done")
        except Exception:  # noqa: BLE001: another process's failure or end was written first
            pass
        self.thread.join(timeout=2)


_watch: Optional[_FailureWatch] = None


def watch_for_failures(report: Callable[[str], int]) -> None:
    """Ends this process when another process of the job stops with an error of its own.

    A process that stops alone (a write failing on process 0, a bad batch on one host, an
    interrupt while the model loads) leaves the others waiting in the next collective
    operation, or in ``jax.distributed``'s shutdown, for minutes, until JAX aborts them with a
    C++ stack. :func:`leave_job_now` with a reason announces such a stop in JAX's coordination
    service; a helper thread of every process waits for that in a blocking read (no cost per
    step) and, unless this process ends by an error of its own within a few seconds, calls
    ``report(message)`` (which prints the message and returns the exit status) and leaves the
    job at once. A no-op unless this process is one of several joined through
    :func:`initialize`; call it once, after joining."""
    global _watch
    client = coordination_client()
    if client is not None and _watch is None:
        _watch = _FailureWatch(client, report)


def another_process_failed() -> Optional[str]:
    """The message of :func:`watch_for_failures` once another process announced a failure, else ``None``."""
    return None if _watch is None else _watch.note


def claim_exit() -> bool:
    """Whether this caller ends this process: ``False`` once the helper thread of
    :func:`watch_for_failures` is ending it for another process's failure (the caller then
    prints nothing of its own and waits: that thread ends the process). Call it before
    printing an error and calling :func:`leave_job_now`."""
    return _watch is None or _watch.claim()


def _first_sentence(text: str) -> str:
    """One line of at most 300 characters: ``text`` up to the end of its first sentence (the
    rest, how to recover, is the failed process's to say)."""
    line = " ".join(text.split())
    return line.split(". ")[0].rstrip(".")[:300]


def leave_job_now(status: int, why: Optional[str] = None) -> None:
    """Ends this process now with exit status ``status`` when it is one of several joined
    through :func:`initialize` (returns otherwise).

    ``why``: this process stops alone (one line: the error, or an interrupt); it is announced
    to the other processes, which end with a message naming this one (:func:`watch_for_failures`).
    Python's exit would wait for them in ``jax.distributed``'s shutdown while they wait in a
    collective operation for this one. Process 0 hosts JAX's coordination service, whose end
    aborts the others: it waits (at most a few seconds more than the others' grace) until every
    other process has marked itself as left, and half a second more for them to end."""
    client = coordination_client()
    if client is None:
        return
    me = jax.process_index()
    if why is not None:
        try:
            client.key_value_set(_FAILED_KEY, f"{me}\t{_first_sentence(str(why))}")
        except Exception:  # noqa: BLE001: another process's failure (or the job's end) was written first
            pass
    try:
        client.key_value_set(f"{_LEFT_DIR}{me}", "1")
    except Exception:  # noqa: BLE001: the service went away (process 0 ended)
        pass
    if me == 0:
        deadline = time.monotonic() + _LEAVE_WAIT_S
        while time.monotonic() < deadline:
            try:
                if len(client.key_value_dir_get(_LEFT_DIR)) >= jax.process_count():
                    time.sleep(_LAST_OUT_S)
                    break
            except Exception:  # noqa: BLE001
                break
            time.sleep(0.05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _print_failure(message: str) -> int:
    """The report of :func:`initialize`'s ``fail_together``: another process of the job failed;
    this process's one line (as the last line of a Python traceback reads) and exit status."""
    print(f"jpeft.errors.DistributedError: {message}", file=sys.stderr, flush=True)
    return 1


_python_hook = None  # sys.excepthook as found by _end_together


def _at_prompt() -> bool:
    """Whether an exception nobody caught leaves this process running: an interactive prompt
    (``sys.ps1`` is set by Python's prompt and ``code.interact``, which call ``sys.excepthook``
    for every error typed there) or ``python -i`` (a script's error opens the prompt)."""
    return hasattr(sys, "ps1") or bool(sys.flags.inspect) or bool(os.environ.get("PYTHONINSPECT"))


def _leave_on_uncaught(kind, value, tb) -> None:
    """``sys.excepthook`` of a process joined with ``fail_together``: an exception nobody
    caught ends this process, and Python's exit would wait for the others in
    ``jax.distributed``'s shutdown while they wait for this one in a collective operation.
    Prints the traceback (one line when it is a consequence of another process leaving),
    tells the others why and ends at once (:func:`leave_job_now`). At an interactive prompt
    (``python``, ``python -i``, ``code.interact``) the exception ends nothing: Python prints it
    and reads the next line, so this hook does only that."""
    if coordination_client() is None or _at_prompt():  # left the job already (shutdown), or the prompt goes on
        _python_hook(kind, value, tb)
        return
    if not claim_exit():
        time.sleep(60)  # the helper thread prints the other process's failure and ends this process
    interrupted = issubclass(kind, KeyboardInterrupt)
    seen = another_process_failed()
    if seen is not None:  # this error is what the other process's leaving did to this one
        _print_failure(seen)
        why = None
    elif lost_peer(value):  # killed without a word: nothing this process did
        why = f"an operation across the processes of this job failed ({_first_sentence(str(value))[:200]})"
        _print_failure(f"{why}: another process left the job (killed, crashed, or stopped by an error: see its "
                       "output); this process stops too. Start every process again.")
    else:
        _python_hook(kind, value, tb)
        why = "interrupted (Ctrl-C or SIGTERM)" if interrupted else f"{kind.__name__}: {value}"
    leave_job_now(130 if interrupted else 1, why)


def _end_together() -> None:
    """:func:`initialize`'s ``fail_together``: :func:`watch_for_failures` with a report that
    prints one ``DistributedError`` line, and an exception nobody catches told to the others
    (:func:`_leave_on_uncaught`). Once per process; nothing outside a multi-process job."""
    global _python_hook
    if coordination_client() is None:
        return
    watch_for_failures(_print_failure)
    if _python_hook is None:
        _python_hook = sys.excepthook
        sys.excepthook = _leave_on_uncaught
