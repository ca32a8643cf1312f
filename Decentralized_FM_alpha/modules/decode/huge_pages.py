"""CPU weights in transparent huge pages.

Decoding one token streams every weight from memory once; with 4 KiB pages that stream also
walks the page tables for every 4 KiB read. Weights copied into anonymous memory advised with
MADV_HUGEPAGE (2 MiB pages) stream faster (benchmarks/README.md). A checkpoint
loaded with mmap lies in the page cache, where huge pages do not apply, so the loaders copy
CPU weights once into such a buffer. Linux only; elsewhere, or turned off (configure(False):
DEJAVU_HUGE_PAGES=0 at a command's edge, decode/environment.py), the tensors are left as they are. Where the kernel ignores the advice, nothing changes but a copy.
"""

import ctypes
import logging
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 1024 * 1024
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
ENABLED = sys.platform.startswith("linux")  # configure() turns it off


def configure(enabled):
    """Copy weights into huge pages from now on (True, on Linux only) or leave them where they are."""
    global ENABLED
    ENABLED = bool(enabled) and sys.platform.startswith("linux")
_libc = {}


def _madvise(address, length):
    if "madvise" not in _libc:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc["madvise"] = libc.madvise
        except (OSError, AttributeError) as error:
            logger.debug("no madvise: %s", error)
            _libc["madvise"] = None
    madvise = _libc["madvise"]
    return madvise is not None and madvise(address, length, MADV_HUGEPAGE) == 0


def huge_page_buffer(nbytes):
    """An uninitialised uint8 CPU tensor of `nbytes` starting on a 2 MiB boundary, its pages
    advised as huge before anything touches them (a plain tensor where that is off or fails)."""
    if not ENABLED or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: fresh, untouched pages
    start = (-raw.data_ptr()) % HUGE_PAGE
    buffer = raw[start:start + nbytes]
    _madvise(buffer.data_ptr(), nbytes - nbytes % HUGE_PAGE or HUGE_PAGE)
    return buffer


def move_to_huge_pages(module):
    """Copy the storages behind the module's CPU floating-point parameters and buffers into one
    huge-page buffer and point every tensor at its copy with its own offset, shape and strides:
    same values, layouts and state-dict keys, and tensors that shared memory (tied weights,
    views of one buffer) still share it. Returns the bytes moved."""
    if not ENABLED:
        return 0
    slots, storages = [], {}
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or not tensor.is_floating_point():
                    continue
                slots.append((table, name, tensor))
                storage = tensor.untyped_storage()
                storages.setdefault(storage.data_ptr(), storage)
    total = sum((storage.nbytes() + 63) // 64 * 64 for storage in storages.values())
    if total < HUGE_PAGE:
        return 0
    buffer = huge_page_buffer(total)
    base = buffer.data_ptr() - buffer.untyped_storage().data_ptr()  # bytes into the buffer's storage
    starts, offset = {}, 0
    with torch.no_grad():
        for address, storage in storages.items():
            old = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
            buffer[offset:offset + storage.nbytes()].copy_(old)
            starts[address] = base + offset
            offset += (storage.nbytes() + 63) // 64 * 64
        moved = {}
        for table, name, tensor in slots:
            if id(tensor) not in moved:
                size = tensor.element_size()
                start = starts[tensor.untyped_storage().data_ptr()] // size + tensor.storage_offset()
                view = torch.empty(0, dtype=tensor.dtype).set_(buffer.untyped_storage(), start, tensor.shape,
                                                               tensor.stride())
                if isinstance(tensor, torch.nn.Parameter):
                    view = torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
                moved[id(tensor)] = view
            table[name] = moved[id(tensor)]
    return total
