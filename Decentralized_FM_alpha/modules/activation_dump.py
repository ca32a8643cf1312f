"""Activation dumps for predictor training: the save variants' recording blocks and the writer.

The files and meta.json are defined in dejavu_common.dump_format (upstream DejaVu's float16
memmaps). Row r is the same token in every file of every layer: every stage sees the same
prompt micro-batches in the same order and writes their real (unpadded) tokens in row-major
order. Only prompt tokens (prefill, no KV cache yet) are dumped.

meta.json is rewritten atomically, under a lock shared by the ranks of one machine, after the
memmaps have been flushed, so its row counts never include rows that were not written. Flushing
forces the rows to disk, so it happens at most every --sp-commit-seconds (and at capacity and at
the end): a killed run loses at most that interval's rows, and meta.json never counts them.

The memmaps are sparse files of the full capacity (400k rows of SmolLM2 would be 64 GB): disk
blocks are taken as rows are written. Writing a page with no block left kills the process with
SIGBUS, so the writer reserves each file's blocks RESERVE_ROWS rows ahead (posix_fallocate): a
full disk is then a DumpError naming the file and the space it needs, the rows already written
stay counted, and --sp-resume continues once there is room.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from dejavu_common.dump_format import (FLOAT16_MAX, META_FILE, TAPS, DumpError, dims_of, dump_file, new_meta,
                                       tap_widths)
from dejavu_common.helpers import LayerSpecError, parse_layers, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 400000
DEFAULT_COMMIT_SECONDS = 10.0
RESERVE_ROWS = 4096  # rows of disk blocks reserved ahead per file (SmolLM2: 22 MB a layer)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def meta_lock(folder):
    with open(os.path.join(folder, ".meta.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_meta(folder):
    path = os.path.join(folder, META_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as error:
        raise DumpError(f"{path}: not valid JSON ({error})") from error


def write_meta(folder, meta):
    write_json_atomic(os.path.join(folder, META_FILE), meta, indent=2)


@dataclass
class DumpSettings:
    folder: str
    capacity: int = DEFAULT_CAPACITY
    resume: bool = False
    force: bool = False
    model: str = ""
    model_type: str = ""
    source: str = ""
    num_layers: int = 0  # layers of the whole pipeline
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    layers: list | None = None  # the layers dumped (--sp-layers); None: all

    @classmethod
    def from_args(cls, args):
        options = getattr(args, "variant_settings", None) or settings_from_args(args, {})
        folder = options.sp_data_path
        if not folder:
            raise DumpError("--sp-data-path (or DATA_PATH) is required for a save model type")
        stages = getattr(args, "pipeline_group_size", 1) or 1
        num_layers = stages * args.num_layers
        try:
            layers = parse_layers(options.sp_layers, num_layers, "--sp-layers")
        except LayerSpecError as error:
            raise DumpError(str(error)) from None
        return cls(
            folder=folder,
            capacity=options.sp_rows,
            resume=options.sp_resume,
            force=options.sp_force,
            model=args.model_name,
            model_type=args.model_type,
            source=getattr(args, "infer_data", "") or "",
            num_layers=num_layers,
            commit_seconds=options.sp_commit_seconds,
            layers=layers,
        )


def same_model(recorded, given):
    """Whether a dump's recorded model names the model given now: the same string, or two
    spellings of one checkpoint folder (relative and absolute, a symlink, a trailing slash)."""
    if recorded == given:
        return True
    if not isinstance(recorded, str) or not isinstance(given, str):
        return False
    try:
        return os.path.samefile(recorded, given)
    except OSError:  # a path that is not there (moved, or a name that is not a path)
        return False


class DumpWriter:
    """Writes this rank's layers; keeps meta.json consistent with what was flushed."""

    def __init__(self, settings, config, layers, first_stage=True, barrier=None):
        if settings.capacity <= 0:
            raise DumpError(f"--sp-rows must be positive, got {settings.capacity}")
        self.settings = settings
        self.folder = settings.folder
        self.layers = [layer for layer in layers if settings.layers is None or layer in settings.layers]
        self.dims = dims_of(config)
        os.makedirs(self.folder, exist_ok=True)
        if first_stage:
            self._initialise_meta()
        if barrier is not None:
            barrier()  # the other stages read what the first stage decided
        meta = read_meta(self.folder)
        if meta is None:
            raise DumpError(f"{self.folder}/meta.json was not created by the first stage")
        self.capacity = meta["capacity"]
        start = min(meta["rows"].values()) if settings.resume else 0
        self.written = {layer: start for layer in self.layers}
        self.capacity_reached = start >= self.capacity
        widths = tap_widths(meta)
        mode = "r+" if settings.resume else "w+"
        self.files = {}
        for layer in self.layers:
            for kind in TAPS:
                path = dump_file(self.folder, kind, layer)
                if settings.resume and not os.path.exists(path):
                    raise DumpError(f"--sp-resume: {path} does not exist")
                self.files[kind, layer] = np.memmap(
                    path, dtype=np.float16, mode=mode, shape=(self.capacity, widths[kind])
                )
        self.row_bytes = {kind: 2 * widths[kind] for kind in TAPS}
        self.reserved = dict(self.written)  # rows of each layer's files backed by disk blocks
        self.last_commit = time.monotonic()
        if start:
            logger.info("resuming the dump in %s at row %d", self.folder, start)

    def _initialise_meta(self):
        s = self.settings
        expected = {"model": s.model, **self.dims, "num_layers": s.num_layers}
        if s.resume and s.layers is not None:
            expected["layers"] = sorted(s.layers)
        with meta_lock(self.folder):
            meta = read_meta(self.folder)
            if meta is not None and not s.force:
                different = {k: (meta.get(k), v) for k, v in expected.items()
                             if not (same_model(meta.get(k), v) if k == "model" else meta.get(k) == v)}
                if different:
                    detail = ", ".join(f"{k}: {old!r} there, {new!r} here" for k, (old, new) in different.items())
                    raise DumpError(
                        f"{self.folder} holds a dump of a different model ({detail}); "
                        "use another --sp-data-path or pass --sp-force"
                    )
            if s.resume:
                if meta is None:
                    raise DumpError(f"--sp-resume: {self.folder}/meta.json does not exist")
                meta.update(complete=False, finished_layers=[])
                write_meta(self.folder, meta)
                return
            if meta is not None:
                logger.warning("overwriting the dump in %s (--sp-resume appends instead)", self.folder)
            write_meta(self.folder, new_meta(s.model, s.model_type, s.capacity, self.dims, s.num_layers, s.source,
                                             s.layers))

    @property
    def accepting(self):
        return not self.capacity_reached

    def write_layer(self, layer, tensors):
        """Append one prefill batch's real tokens of `layer` ({kind: [n, width] tensor})."""
        start = self.written[layer]
        count = min(len(tensors["att_x"]), self.capacity - start)
        if count <= 0:
            return
        self._reserve(layer, start + count)
        for kind in TAPS:
            values = tensors[kind][:count].clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
            self.files[kind, layer][start : start + count] = values.cpu().numpy()
        self.written[layer] = start + count
        if len(set(self.written.values())) == 1:  # every layer of this stage has the batch
            if self.written[layer] >= self.capacity:
                if not self.capacity_reached:
                    logger.warning("dump capacity of %d rows reached; dumping stops", self.capacity)
                self.capacity_reached = True
            if self.capacity_reached or time.monotonic() - self.last_commit >= self.settings.commit_seconds:
                self.commit()

    def _reserve(self, layer, rows):
        """Disk blocks for the first `rows` rows of the layer's files (RESERVE_ROWS ahead), or a
        DumpError where the disk is full. Where the system cannot reserve (no posix_fallocate,
        a file system without it), rows are written as before."""
        have = self.reserved[layer]
        if rows <= have or not hasattr(os, "posix_fallocate"):
            return
        want = min(self.capacity, max(rows, have + RESERVE_ROWS))
        for kind in TAPS:
            path, size = dump_file(self.folder, kind, layer), self.row_bytes[kind]
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, have * size, (want - have) * size)
            except OSError as error:
                if error.errno not in FULL_DISK:
                    logger.debug("%s: cannot reserve disk blocks (%s); writing without", path, error)
                    continue
                free = shutil.disk_usage(self.folder).free
                raise DumpError(
                    f"{path}: no space left on the device for rows {have}-{want - 1} "
                    f"({(want - have) * size / 1e6:.1f} MB; {free / 1e6:.0f} MB free). The {self.written[layer]} "
                    "rows written before stay in the dump: free space, or dump fewer layers (--sp-layers), "
                    "then continue with --sp-resume") from None
            finally:
                os.close(fd)
        self.reserved[layer] = want

    def commit(self, finished=False):
        for array in self.files.values():
            array.flush()
        with meta_lock(self.folder):
            meta = read_meta(self.folder)
            for layer in self.layers:
                meta["rows"][str(layer)] = self.written[layer]
            meta["tokens"] = min(meta["rows"].values())
            meta["capacity_reached"] = meta["capacity_reached"] or self.capacity_reached
            if finished:
                done = set(meta.get("finished_layers", [])) | set(self.layers)
                meta["finished_layers"] = sorted(done)
                meta["complete"] = done >= set(meta["layers"])
            write_meta(self.folder, meta)
        self.last_commit = time.monotonic()

    def close(self, ok):
        self.commit(finished=ok)
        self.files.clear()


def real_tokens(value, token_mask):
    """[B, S, ...] -> [n, ...] keeping real tokens in row-major order."""
    if token_mask is None:
        return value.reshape(-1, *value.shape[2:])
    return value[token_mask]


class RecordingBlockMixin:
    """Mixed in before a dense block class: records the four taps during prefill."""

    dump = None

    def forward(self, x, layer_past=None, mask=None):
        self.recorded = {} if (self.dump is not None and layer_past is None and self.dump.accepting) else None
        output = super().forward(x, layer_past=layer_past, mask=mask)
        if self.recorded is not None:
            self.dump.write_layer(self.layer_index, self.recorded)
            self.recorded = None
        return output

    def tap(self, name, value, token_mask):
        if getattr(self, "recorded", None) is not None:
            tokens = real_tokens(value.detach(), token_mask)
            if name == "head_out":
                self.recorded["att_label"] = tokens.float().norm(dim=-1)  # [n, H]
            elif name == "mlp_act":
                self.recorded["mlp_label"] = tokens
            else:
                self.recorded[name] = tokens
        return value


def add_arguments(parser):
    group = parser.add_argument_group("activation dump (save model types)")
    group.add_argument("--sp-data-path", default=None, help="dump folder (default: $DATA_PATH)")
    group.add_argument("--sp-rows", type=int, default=DEFAULT_CAPACITY, help="capacity N: rows per file")
    group.add_argument("--sp-resume", action="store_true", help="append after the rows meta.json records")
    group.add_argument("--sp-force", action="store_true", help="overwrite a dump of a different model")
    group.add_argument("--sp-layers", default=None,
                       help="layers to dump, e.g. '2,7,12' or '0-29' (default: $SP_LAYERS or all); a subset keeps "
                            "a large dump within disk: each layer costs 2 x (2 d + I + H) bytes per token")
    group.add_argument("--sp-commit-seconds", type=float, default=DEFAULT_COMMIT_SECONDS,
                       help="flush the files and update meta.json at most this often (0: after every batch)")


@dataclass(frozen=True)
class DumpOptions:
    """The save variant's settings, from its flags (settings_from_args) or model_args (settings_from_values)."""

    sp_data_path: str | None = None
    sp_rows: int = DEFAULT_CAPACITY
    sp_resume: bool = False
    sp_force: bool = False
    sp_layers: str = "all"
    sp_commit_seconds: float = DEFAULT_COMMIT_SECONDS


def settings_from_args(args, environ):
    """DumpOptions of the parsed flags; --sp-data-path and --sp-layers default to $DATA_PATH and $SP_LAYERS."""
    return DumpOptions(
        sp_data_path=getattr(args, "sp_data_path", None) or environ.get("DATA_PATH") or None,
        sp_rows=getattr(args, "sp_rows", DEFAULT_CAPACITY),
        sp_resume=bool(getattr(args, "sp_resume", False)),
        sp_force=bool(getattr(args, "sp_force", False)),
        sp_layers=getattr(args, "sp_layers", None) or environ.get("SP_LAYERS") or "all",
        sp_commit_seconds=getattr(args, "sp_commit_seconds", DEFAULT_COMMIT_SECONDS),
    )


def settings_from_values(values):
    """DumpOptions of the lm-eval adapter's model_args (the flags' underscore names)."""
    fields = {f.name: f.type for f in dataclasses.fields(DumpOptions)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DumpError(f"model_args: unknown argument(s) {', '.join(unknown)} for a save model type; "
                        f"known: {', '.join(sorted(fields))}")
    parsed = {}
    for name, value in values.items():
        default = getattr(DumpOptions, name)
        try:
            if isinstance(default, bool):
                parsed[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)):
                parsed[name] = type(default)(value)
            else:
                parsed[name] = str(value)
        except ValueError:
            raise DumpError(f"model_args: {name}={value!r} is not a {type(default).__name__}") from None
    return DumpOptions(**parsed)


def prepare_stage(blocks, args, config):
    """Attach one writer to this rank's blocks (the runner calls this after building them)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    stage = getattr(args, "rank", 0) if distributed else 0
    writer = DumpWriter(
        DumpSettings.from_args(args),
        config,
        [block.layer_index for block in blocks],
        first_stage=(dist.get_rank() == 0) if distributed else True,
        barrier=dist.barrier if distributed else None,
    )
    for block in blocks:
        block.dump = writer if block.layer_index in writer.layers else None
    logger.info("stage %s dumps layers %s to %s", stage, writer.layers, writer.folder)
    return writer
