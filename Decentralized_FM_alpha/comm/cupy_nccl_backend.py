"""Upstream's cupy NCCL backend for point-to-point activations (optional: needs cupy).

Imported only for `--dist-backend cupy_nccl`. torch.distributed (gloo) still carries the
control messages and the store still carries the heartbeat; this class only moves tensors.
Receives run on the current CUDA stream; sends run on their own stream (after the current
stream's work), so a stage never blocks its compute on a send and the token ring cannot
deadlock. The NCCL unique id is shared through the rendezvous store.
"""

import pickle
import time

import torch

try:
    import cupy
    from cupy.cuda import nccl
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError(
        "--dist-backend cupy_nccl needs cupy with NCCL (pip install -r requirements-cupy.txt); "
        "or use --dist-backend nccl"
    ) from error


def _nccl_dtype(dtype):
    table = {
        torch.float32: nccl.NCCL_FLOAT32,
        torch.float16: nccl.NCCL_FLOAT16,
        torch.float64: nccl.NCCL_FLOAT64,
        torch.int64: nccl.NCCL_INT64,
        torch.int32: nccl.NCCL_INT32,
        torch.uint8: nccl.NCCL_UINT8,
    }
    if hasattr(nccl, "NCCL_BFLOAT16"):
        table[torch.bfloat16] = nccl.NCCL_BFLOAT16
    try:
        return table[dtype]
    except KeyError:
        raise TypeError(f"cupy NCCL cannot send {dtype}") from None


class CupyNCCLPeerToPeer:
    def __init__(self, store, rank, world_size, device, timeout=600.0):
        self.rank = rank
        self.device = torch.device(device)
        key = "cupy_nccl_unique_id"
        if rank == 0:
            store.set(key, pickle.dumps(nccl.get_unique_id()))
        else:
            deadline = time.monotonic() + timeout
            while not store.check([key]):
                if time.monotonic() > deadline:
                    raise TimeoutError("rank 0 did not publish the NCCL unique id")
                time.sleep(0.05)
        unique_id = pickle.loads(store.get(key))
        with cupy.cuda.Device(self.device.index):
            self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)
        self.send_stream = torch.cuda.Stream(device=self.device)

    def send(self, tensor, dst):
        current = torch.cuda.current_stream(self.device)
        self.send_stream.wait_stream(current)
        with torch.cuda.stream(self.send_stream):
            tensor.record_stream(self.send_stream)
            self.comm.send(tensor.data_ptr(), tensor.numel(), _nccl_dtype(tensor.dtype), dst,
                           self.send_stream.cuda_stream)

    def recv(self, tensor, src):
        stream = torch.cuda.current_stream(self.device)
        self.comm.recv(tensor.data_ptr(), tensor.numel(), _nccl_dtype(tensor.dtype), src, stream.cuda_stream)
        stream.synchronize()

    def synchronize(self):
        self.send_stream.synchronize()
