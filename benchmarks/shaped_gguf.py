"""A random-weight GGUF of a larger Llama's shape, with the embedded SmolLM2's tokenizer.

No hub here: only the embedded SmolLM2 is on disk. Its rows are narrow (hidden 576), so a kept
neuron of the sparse MLP is a short run of memory, and its speed figures say little about a
Llama of the usual size. This file is such a Llama's shape (its hidden, MLP and head widths, and
as many layers as asked) with SmolLM2's vocabulary and tokenizer keys, its weight matrices
N(0, 0.02) in F16 and its norms 1 (F32). Its tokens mean nothing; only speed does. One file is
what both sides read: llama.cpp runs it, the converter makes the engine's checkpoint from it.

    .venv/bin/python benchmarks/bench_peer.py --shape llama-3.2-3b --shape-layers 8
"""

import numpy as np

SHAPES = {  # the Llama 3.2 configs' widths (config.json of meta-llama/Llama-3.2-{1B,3B})
    "llama-3.2-1b": dict(hidden=2048, inter=8192, heads=32, kv_heads=8, layers=16),
    "llama-3.2-3b": dict(hidden=3072, inter=8192, heads=24, kv_heads=8, layers=28),
}
INIT_STD = 0.02  # Llama's initializer_range


class ShapeError(ValueError):
    pass


def shape_of(name, layers=None):
    """The shape's widths, with `layers` layers (None: the model's own count)."""
    if name not in SHAPES:
        raise ShapeError(f"--shape {name!r}: choose one of {', '.join(SHAPES)}")
    shape = dict(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise ShapeError(f"--shape-layers {layers}: at least 1")
        shape["layers"] = layers
    return shape


def shaped_name(name, layers):
    return f"random-{name}-{layers}-layers"


def tensor_shapes(shape, vocab):
    """{GGUF tensor name: numpy shape [out, in]} of a Llama with tied embeddings."""
    d, inter, head_dim = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    tensors = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for layer in range(shape["layers"]):
        block = f"blk.{layer}."
        tensors.update({block + "attn_norm.weight": (d,), block + "attn_q.weight": (d, d),
                        block + "attn_k.weight": (kv, d), block + "attn_v.weight": (kv, d),
                        block + "attn_output.weight": (d, d), block + "ffn_norm.weight": (d,),
                        block + "ffn_gate.weight": (inter, d), block + "ffn_up.weight": (inter, d),
                        block + "ffn_down.weight": (d, inter)})
    return tensors


def write_shaped_gguf(template, out, name, layers=None, seed=0, progress=True):
    """Write `out`: the Llama `name` (SHAPES) with `layers` layers, random F16 weights and the
    keys of the GGUF `template` (its tokenizer and vocabulary) but the widths. Appears whole or not
    at all (a temporary name, then a rename)."""
    import gguf
    from tqdm import tqdm

    from dejavu_llama.gguf_precision import GGUFPrecisionError, architecture, copy_metadata, gguf_writer

    shape = shape_of(name, layers)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise ShapeError(f"{name}: {shape['heads']} heads do not divide hidden {shape['hidden']} "
                         f"or are not a multiple of {shape['kv_heads']} key/value heads")
    try:
        reader = gguf.GGUFReader(template)
    except Exception as error:  # the reader raises ValueError, struct.error, ... on a bad file
        raise GGUFPrecisionError(f"{template}: not a readable GGUF file ({error})") from None
    arch = architecture(reader, template)
    if arch != "llama":
        raise ShapeError(f"{template}: a {arch!r} GGUF; the template must be a llama one")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    widths = {f"{arch}.block_count": shape["layers"], f"{arch}.embedding_length": shape["hidden"],
              f"{arch}.feed_forward_length": shape["inter"], f"{arch}.attention.head_count": shape["heads"],
              f"{arch}.attention.head_count_kv": shape["kv_heads"],
              f"{arch}.rope.dimension_count": shape["hidden"] // shape["heads"]}
    skipped = ("general.architecture", "general.file_type", "general.name", "general.size_label", *widths)
    rng = np.random.default_rng(seed)
    with gguf_writer(out, arch) as writer:
        copy_metadata(reader, writer, skipped)
        writer.add_name(f"{shaped_name(name, shape['layers'])} (random weights)")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        for key, value in widths.items():
            writer.add_uint32(key, value)
        for tensor, dims in tqdm(tensor_shapes(shape, vocab).items(), desc=f"random {name}", disable=not progress):
            if len(dims) == 1:
                writer.add_tensor(tensor, np.ones(dims, dtype=np.float32))
            else:
                writer.add_tensor(tensor, (rng.standard_normal(dims, dtype=np.float32) * INIT_STD).astype(np.float16))
    return out
