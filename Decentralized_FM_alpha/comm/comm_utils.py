"""Point-to-point communication between pipeline ranks, with failure detection that never hangs.

Ranks meet through `torch.distributed.rendezvous` (env:// from torchrun, or upstream's explicit
`--rank --dist-url tcp://host:port`). Activations go over the process group: NCCL on GPUs,
gloo on CPU; `cupy_nccl` (upstream's backend) is imported only when asked for.

Failure handling (the contract: if one rank dies, every other rank exits non-zero within
about `comm_timeout` seconds, with a message naming the lost rank):

* A transfer that fails (gloo reports a closed connection at once) is turned into a
  `CommError` naming the peer.
* Every rank runs a watchdog thread that beats a counter in the rendezvous store once a
  second and reads the others'. A rank whose counter has not moved for `comm_timeout`
  seconds (killed, stopped, machine gone) is declared lost. This also covers backends that
  would block forever in a receive (NCCL).
* The first rank to learn of a failure posts it under the store key `abort`; a rank whose
  transfer fails because a neighbour exited *because of* that failure reports the original
  culprit, not the neighbour. The watchdog of every rank polls `abort` and ends its process
  (after the stage's emergency clean-up) when it appears, even if the main thread is blocked
  inside a receive.

Individual transfers have a long timeout (`op_timeout`, default 30 minutes): a stage may
legitimately wait a long time for its upstream neighbour (slow first batch, big model on CPU);
liveness is the heartbeat's job, not the transfer timeout's.
"""

import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo", "cupy_nccl")
ABORT_KEY = "abort"
EXIT_CODE = 1

_exit_lock = threading.Lock()
_emergency_callbacks = []


class CommError(RuntimeError):
    """A peer was lost or a transfer failed; the message names the rank at fault."""


def register_emergency_cleanup(callback):
    """Run `callback()` if the process is ended by the watchdog (the main thread may be stuck)."""
    _emergency_callbacks.append(callback)


def unregister_emergency_cleanup(callback):
    if callback in _emergency_callbacks:
        _emergency_callbacks.remove(callback)


def run_emergency_cleanup():
    while _emergency_callbacks:
        callback = _emergency_callbacks.pop()
        try:
            callback()
        except Exception:  # never mask the original failure
            logger.exception("clean-up after failure raised")


def fatal_exit(message):
    """Log `message`, run the emergency clean-ups and end the process now (any thread)."""
    if not _exit_lock.acquire(blocking=False):
        # The main thread (or another watchdog path) is already reporting a failure.
        time.sleep(30)
        os._exit(EXIT_CODE)
    logger.error("%s", message)
    run_emergency_cleanup()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def claim_exit():
    """The main thread takes the right to report the failure; False if the watchdog has it."""
    return _exit_lock.acquire(blocking=False)


def release_exit():
    """After an in-process run reported its failure (tests call main() repeatedly)."""
    if _exit_lock.locked():
        _exit_lock.release()


def resolve_backend(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"unknown --dist-backend {backend!r}; known: {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "nccl" if on_cuda else "gloo"
    if backend in ("nccl", "cupy_nccl") and not on_cuda:
        raise ValueError(f"--dist-backend {backend} needs a CUDA device; use gloo (or auto) on CPU")
    return backend


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


class LocalCommunicator:
    """World of one: no process group, nothing to send."""

    rank = 0
    world_size = 1

    def send(self, tensor, dst, what="tensor"):
        raise CommError("a one-rank pipeline has no peer to send to")

    def recv(self, tensor, src, what="tensor"):
        raise CommError("a one-rank pipeline has no peer to receive from")

    def broadcast_object(self, obj, src=0):
        return obj

    def wait_sends(self):
        pass

    def abort(self, message):
        return message

    def finish(self):
        pass

    def close(self):
        pass


class TorchCommunicator:
    """Point-to-point sends/receives between pipeline ranks over torch.distributed."""

    def __init__(self, store, rank, world_size, backend, device, comm_timeout=60.0,
                 op_timeout=1800.0, hosts_store=False, store_host="rank 0", heartbeat_interval=1.0):
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = torch.device(device)
        self.comm_timeout = float(comm_timeout)
        self.hosts_store = hosts_store
        self.store_host = store_host
        self.heartbeat_interval = heartbeat_interval
        self.raw_store = store
        self.store = dist.PrefixStore("dejavu_pipeline/", store)
        self.pending_sends = []
        self.posted_abort = None
        self.stopping = threading.Event()
        pg_backend = "gloo" if backend == "cupy_nccl" else backend
        dist.init_process_group(
            backend=pg_backend, store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=op_timeout),
        )
        # Control messages (the request plan, barriers) always go over gloo on the CPU.
        self.cpu_group = dist.new_group(backend="gloo") if pg_backend != "gloo" else None
        self.p2p = None
        if backend == "cupy_nccl":
            from dejavu_llama.comm.cupy_nccl_backend import CupyNCCLPeerToPeer  # cupy only when asked for

            self.p2p = CupyNCCLPeerToPeer(self.store, rank, world_size, self.device)
        self.watchdog = threading.Thread(target=self._watch, name="pipeline-watchdog", daemon=True)
        self.watchdog.start()
        logger.info("rank %d of %d joined (%s backend)", rank, world_size, backend)

    # ----------------------------------------------------------------- transfers
    def send(self, tensor, dst, what="tensor"):
        """Start sending `tensor` to rank `dst`; completion is checked later (never blocks)."""
        tensor = tensor.contiguous()
        try:
            if self.p2p is not None:
                self.p2p.send(tensor, dst)
                work = None
            else:
                work = dist.isend(tensor, dst)
        except Exception as error:
            raise self.peer_error(dst, f"sending {what} to it", error) from error
        self.pending_sends.append((work, tensor, dst, what))
        self._reap(block=False)

    def recv(self, tensor, src, what="tensor"):
        """Fill `tensor` from rank `src` (blocking)."""
        try:
            if self.p2p is not None:
                self.p2p.recv(tensor, src)
            else:
                dist.recv(tensor, src)
        except Exception as error:
            raise self.peer_error(src, f"receiving {what} from it", error) from error
        self._reap(block=False)
        return tensor

    def _reap(self, block):
        still = []
        for work, tensor, dst, what in self.pending_sends:
            if work is None:
                continue
            if block or work.is_completed():
                try:
                    work.wait()
                except Exception as error:
                    raise self.peer_error(dst, f"sending {what} to it", error) from error
            else:
                still.append((work, tensor, dst, what))
        self.pending_sends = still

    def wait_sends(self):
        self._reap(block=True)
        if self.p2p is not None:
            self.p2p.synchronize()

    def broadcast_object(self, obj, src=0):
        holder = [obj if self.rank == src else None]
        try:
            dist.broadcast_object_list(holder, src=src, group=self.cpu_group)
        except Exception as error:
            peer = src if self.rank != src else "?"
            raise self.peer_error(peer, "sharing the request plan", error) from error
        return holder[0]

    # ----------------------------------------------------------------- failures
    def describe(self, peer):
        return f"rank {peer} (pipeline stage {peer} of {self.world_size})"

    def read_abort(self):
        """The failure another rank posted, or None (also None if the store is gone)."""
        try:
            if self.store.check([ABORT_KEY]):
                value = self.store.get(ABORT_KEY).decode()
                return value or None
        except Exception:
            return None
        return None

    def post_abort(self, message):
        """Post `message` as the run's failure unless one is there; return the one that stands."""
        if self.posted_abort is not None:
            return self.posted_abort
        try:
            current = self.store.compare_set(ABORT_KEY, "", message).decode()
        except Exception:
            current = message
        self.posted_abort = current or message
        try:
            self.store.set(f"abort_seen/{self.rank}", "1")
        except Exception:
            pass
        return self.posted_abort

    def peer_error(self, peer, doing, error):
        """A transfer with `peer` failed: blame the original culprit if one was posted."""
        # A neighbour that exits because of someone else's failure posts it first; give it
        # a moment to land so the message names the rank that was really lost.
        deadline = time.monotonic() + 2.0
        reported = self.read_abort()
        while reported is None and time.monotonic() < deadline:
            time.sleep(0.1)
            reported = self.read_abort()
        if reported is not None:
            self.post_abort(reported)
            return CommError(f"aborting: {reported}")
        who = self.describe(peer) if isinstance(peer, int) else "a peer"
        message = f"lost peer {who}: {doing} failed: {first_line(error)} [detected by rank {self.rank}]"
        self.post_abort(message)
        return CommError(message)

    def abort(self, message):
        """The main thread failed with `message`: tell the other ranks, return what to log."""
        standing = self.read_abort()
        if standing is None:
            standing = self.post_abort(f"rank {self.rank} failed: {message}")
        else:
            self.post_abort(standing)
        self.stopping.set()
        self._linger()
        return standing

    def _linger(self):
        """The store lives in this process: keep it up until every other rank has read `abort`
        (or is gone: no heartbeat for a moment), at most a few seconds."""
        if not self.hosts_store:
            return
        deadline = time.monotonic() + 5.0
        last = {}
        while time.monotonic() < deadline:
            try:
                now, waiting = time.monotonic(), False
                for peer in range(self.world_size):
                    if peer == self.rank or self.store.check([f"abort_seen/{peer}"]):
                        continue
                    beats = int(self.store.add(f"heartbeat/{peer}", 0))
                    if peer not in last or last[peer][0] != beats:
                        last[peer] = (beats, now)
                    if now - last[peer][1] < 2.5 * self.heartbeat_interval:
                        waiting = True
                if not waiting:
                    return
            except Exception:
                return
            time.sleep(0.1)

    def _watch(self):
        seen = {}
        store_down_since = None
        while not self.stopping.wait(self.heartbeat_interval):
            now = time.monotonic()
            try:
                self.store.add(f"heartbeat/{self.rank}", 1)
                reported = self.read_abort()
                if reported is not None and self.posted_abort is None:
                    self.post_abort(reported)
                    self.stopping.set()
                    self._linger()
                    fatal_exit(f"aborting: {reported}")
                for peer in range(self.world_size):
                    if peer == self.rank or self.store.check([f"done/{peer}"]):
                        continue
                    beats = int(self.store.add(f"heartbeat/{peer}", 0))
                    if peer not in seen or seen[peer][0] != beats:
                        seen[peer] = (beats, now)
                    elif now - seen[peer][1] > self.comm_timeout:
                        message = (
                            f"lost peer {self.describe(peer)}: no heartbeat for "
                            f"{self.comm_timeout:.0f} s [detected by rank {self.rank}]"
                        )
                        standing = self.post_abort(message)
                        self.stopping.set()
                        self._linger()
                        fatal_exit(f"aborting: {standing}")
                store_down_since = None
            except Exception as error:
                if self.stopping.is_set():
                    return
                store_down_since = store_down_since or now
                if now - store_down_since > max(3 * self.heartbeat_interval, 2.0):
                    self.stopping.set()
                    fatal_exit(
                        f"aborting: lost peer {self.store_host}: the rendezvous store it hosts is "
                        f"unreachable ({first_line(error)}) [detected by rank {self.rank}]"
                    )

    # ----------------------------------------------------------------- shutdown
    def finish(self):
        """Normal end: flush sends, meet every rank, stop the watchdog, leave the group."""
        self.wait_sends()
        self.store.set(f"done/{self.rank}", "1")
        try:
            dist.barrier(group=self.cpu_group)
        except Exception as error:
            raise self.peer_error("?", "the final barrier", error) from error
        self.stopping.set()
        self.watchdog.join(timeout=5)
        self.store.add("finished", 1)
        if self.hosts_store:  # keep the store up until every rank is past it
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and int(self.store.add("finished", 0)) < self.world_size:
                time.sleep(0.05)
        self.close()

    def close(self):
        self.stopping.set()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def init_communicator(dist_url=None, rank=-1, world_size=1, backend="auto", device="cpu",
                      comm_timeout=60.0, op_timeout=1800.0, environ=None):
    """A communicator for this rank: torchrun's env:// or an explicit tcp:// URL. `environ`: the
    launcher's variables (the runner passes its process's: RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns (communicator, rank, world_size). A world of one needs no process group.
    """
    environ = environ or {}
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in environ or (
        "RANK" in environ and "WORLD_SIZE" in environ and "MASTER_ADDR" in environ
    )
    if launched_by_torchrun and (dist_url is None or dist_url == "env://"):
        url = "env://"
        rank = int(environ["RANK"])
        world_size = int(environ["WORLD_SIZE"])
    else:
        url = dist_url
    if world_size == 1:
        return LocalCommunicator(), 0, 1
    if not url:
        raise ValueError("a multi-rank run needs --dist-url tcp://HOST:PORT (or start it with torchrun)")
    if url != "env://" and rank < 0:
        raise ValueError(f"--rank is required with --dist-url {url}")
    backend = resolve_backend(backend, device)
    logger.info("rank %s: joining %s (world size %d)", rank, url, world_size)
    store, rank, world_size = next(
        dist.rendezvous(url, rank=rank, world_size=world_size, timeout=timedelta(seconds=op_timeout))
    )
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if url == "env://":
        hosts_store = rank == 0 and not agent_store
        store_host = "the torchrun agent" if agent_store else "rank 0"
    else:
        hosts_store, store_host = rank == 0, "rank 0"
    communicator = TorchCommunicator(
        store, rank, world_size, backend, device, comm_timeout=comm_timeout, op_timeout=op_timeout,
        hosts_store=hosts_store, store_host=store_host,
    )
    return communicator, rank, world_size
