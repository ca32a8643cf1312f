"""Shared machinery of the checkpoint converters: source lookup, lazy tensor reading, atomic output.

A converted checkpoint is one folder: config.json, tokenizer files, pytorch_embs.pt,
pytorch_{i}.pt per layer, pytorch_lm_head.pt and conversion.json (written last, the mark of a
complete conversion). It is built in a temporary sibling folder and renamed into place, so a
failed conversion never leaves a folder that looks complete.
"""

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile

import torch
from tqdm import tqdm

from dejavu_llama.modules.common import resolve_dtype

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_FILE = "conversion.json"
EMBEDDINGS_FILE = "pytorch_embs.pt"
LM_HEAD_FILE = "pytorch_lm_head.pt"


class ConversionError(RuntimeError):
    pass


def layer_file(index):
    return f"pytorch_{index}.pt"


def base_parser(description, with_gguf=False):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-name", required=True, help="hub id or local folder of the model")
    parser.add_argument("--save-path", required=True, help="output folder of the per-layer checkpoint")
    parser.add_argument("--auth-token", default=os.environ.get("HF_TOKEN"), help="hub token for gated models")
    parser.add_argument("--dtype", default=None, help="store weights as this dtype (default: as the source)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at --save-path")
    if with_gguf:
        parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model-name's folder")
    return parser


def resolve_source(model_name, auth_token=None):
    """A local folder holding the model: `model_name` itself or a hub snapshot of it."""
    expanded = os.path.expanduser(model_name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ConversionError(f"--model-name {model_name}: is a file, expected a folder or a hub id")
    if expanded.startswith((".", "/", "~")) or expanded.count("/") > 1:
        raise ConversionError(f"--model-name {model_name}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model_name,
            token=auth_token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin", "tokenizer*"],
        )
    except Exception as error:
        raise ConversionError(
            f"--model-name {model_name}: not a local folder and the hub download failed ({error})"
        ) from error


class TensorSource:
    """Reads named tensors lazily from safetensors shards or PyTorch .bin files in a folder."""

    def __init__(self, folder):
        self.folder = folder
        self.location = {}
        self.handles = {}
        shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if shards:
            from safetensors import safe_open

            for shard in shards:
                handle = safe_open(shard, framework="pt")
                self.handles[shard] = handle
                for key in handle.keys():
                    self.location[key] = shard
        else:
            for shard in sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))):
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                self.handles[shard] = state
                for key in state:
                    self.location[key] = shard
        if not self.location:
            raise ConversionError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")

    @classmethod
    def from_state_dict(cls, state, name):
        source = cls.__new__(cls)
        source.folder = name
        source.handles = {name: state}
        source.location = {key: name for key in state}
        return source

    def keys(self):
        return self.location.keys()

    def get(self, key):
        handle = self.handles[self.location[key]]
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]


def existing_checkpoint_state(save_path, signature):
    """'absent', 'same' (a complete conversion of the same source) or 'different'."""
    if not os.path.exists(save_path) or (os.path.isdir(save_path) and not os.listdir(save_path)):
        return "absent"
    marker = os.path.join(save_path, MARKER_FILE)
    try:
        with open(marker) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return "different"
    return "same" if all(recorded.get(k) == v for k, v in signature.items()) else "different"


def write_checkpoint(save_path, signature, plan, source, extras, dtype=None, force=False):
    """Write the files of `plan` ({file: [(source_key, key), ...]}) atomically at `save_path`,
    with each of `extras` (the config, the tokenizer) saved beside them by its save_pretrained.
    Returns False if an identical conversion already exists (and `force` is off).
    """
    state = existing_checkpoint_state(save_path, signature)
    if state == "same" and not force:
        logger.info("%s already holds this conversion; nothing to do (--force redoes it)", save_path)
        return False
    if state == "different" and not force:
        raise ConversionError(
            f"--save-path {save_path} already holds a different checkpoint; pass --force to replace it"
        )
    dtype = resolve_dtype(dtype)
    parent = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(save_path)}.partial-", dir=parent)
    os.chmod(staging, 0o755)
    try:
        for extra in extras:
            extra.save_pretrained(staging)
        for file_name, keys in tqdm(plan.items(), desc="converting", unit="file"):
            tensors = {}
            for source_key, key in keys:
                tensor = source.get(source_key)
                tensors[key] = (tensor.to(dtype) if dtype is not None else tensor).contiguous().clone()
            torch.save(tensors, os.path.join(staging, file_name))
            del tensors
        with open(os.path.join(staging, MARKER_FILE), "w") as handle:
            json.dump({**signature, "files": sorted(plan)}, handle, indent=2)
        if os.path.exists(save_path):
            retired = save_path.rstrip("/") + f".old-{os.getpid()}"
            os.rename(save_path, retired)
            os.rename(staging, save_path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, save_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %d layers to %s", signature["num_layers"], save_path)
    return True


def run_converter(main):
    """Run a converter's main(argv) with logging; expected failures exit 1 with one message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(sys.argv[1:])
    except (ConversionError, ValueError, OSError) as error:
        logger.error("%s", error)
        sys.exit(1)
