"""Process groups for the pipeline: torch.distributed (gloo on CPU, NCCL on GPU), cupy NCCL optional.

`comm_utils.init_communicator(...)` is the entry point; cupy is imported only when the
`cupy_nccl` backend is asked for.
"""
