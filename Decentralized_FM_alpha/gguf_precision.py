"""A GGUF model written again at another precision: every weight matrix de-quantized and stored as
F32, F16 or BF16 (norm weights and other 1-D tensors stay F32, as llama.cpp's converter keeps
them), the metadata and tokenizer copied as they are. llama.cpp (benchmarks/bench_peer.py) then
runs the same weights as the engine, at the precision it is compared in.

    python convert_llama_checkpoint.py --model-name FOLDER --gguf-file model.Q4_1.gguf \
        --save-path ../pretrained_models/x --gguf-out /tmp/model.f16.gguf --gguf-type f16
"""

import contextlib
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

# --gguf-type: (the tensors' GGML type name, general.file_type's LlamaFileType name)
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16")}
SKIPPED_KEYS = ("general.architecture", "general.file_type")  # set by the writer / for the new type


class GGUFPrecisionError(ValueError):
    pass


def copy_metadata(reader, writer, skipped=SKIPPED_KEYS):
    """The reader's keys (the tokenizer's included) into the writer, but GGUF's own and `skipped`."""
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skipped:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)


def architecture(reader, path):
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFPrecisionError(f"{path}: no general.architecture key: not a GGUF model file")
    return field.contents()


@contextlib.contextmanager
def gguf_writer(out, arch):
    """A GGUFWriter whose file appears at `out` whole, once the block ends without an error (a
    temporary name, then a rename), or not at all."""
    import gguf

    temporary = f"{out}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(temporary, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_gguf(source, out, gguf_type, progress=True):
    """Write the GGUF file `source` again as `out`, its weight matrices in gguf_type (f32, f16,
    bf16). The file appears whole or not at all (a temporary name, then a rename)."""
    import gguf
    from tqdm import tqdm

    if gguf_type not in GGUF_TYPES:
        raise GGUFPrecisionError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if not os.path.isfile(source):
        raise GGUFPrecisionError(f"{source}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(source)
    except Exception as error:  # the reader raises ValueError, struct.error, ... on a bad file
        raise GGUFPrecisionError(f"{source}: not a readable GGUF file ({error})") from None
    type_name, file_type = GGUF_TYPES[gguf_type]
    matrix_type = gguf.GGMLQuantizationType[type_name]
    with gguf_writer(out, architecture(reader, source)) as writer:
        copy_metadata(reader, writer)
        writer.add_file_type(gguf.LlamaFileType[file_type])
        for tensor in tqdm(reader.tensors, desc=f"GGUF tensors to {type_name}", disable=not progress):
            values = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            if values.ndim < 2 or matrix_type == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, values)
            elif matrix_type == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:  # numpy has no bfloat16: its bytes, with the type named
                writer.add_tensor(tensor.name, gguf.quantize(values, matrix_type), raw_dtype=matrix_type)
    logger.info("wrote %s (%s weight matrices, %d tensors)", out, type_name, len(reader.tensors))
    return out
