"""benchmarks/shaped_gguf.py: a random-weight GGUF of a larger Llama's widths with the embedded
SmolLM2's tokenizer is a Llama GGUF that the converter (through transformers' GGUF reader) and, when
installed, llama.cpp load at those widths; a shape it does not know is a named error."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_peer  # noqa: E402
import shaped_gguf  # noqa: E402
from dejavu_common.helpers import EmbeddedModelMissing, embedded_gguf  # noqa: E402

TINY = dict(hidden=64, inter=160, heads=4, kv_heads=2, layers=3)


@pytest.fixture
def template():
    try:
        return os.path.join(*embedded_gguf())
    except EmbeddedModelMissing as error:
        pytest.skip(str(error))


def test_the_file_has_the_shape_and_the_template_vocabulary(tmp_path, monkeypatch, template):
    import gguf
    import torch

    from dejavu_llama.modules.local_model import LocalModel

    monkeypatch.setitem(shaped_gguf.SHAPES, "tiny", TINY)
    path = shaped_gguf.write_shaped_gguf(template, str(tmp_path / "tiny.f16.gguf"), "tiny", layers=2, progress=False)
    reader, source = gguf.GGUFReader(path), gguf.GGUFReader(template)
    field = lambda r, key: r.fields[key].contents()  # noqa: E731
    assert field(reader, "llama.block_count") == 2 and field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.feed_forward_length") == 160 and field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == 16
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(source.fields["tokenizer.ggml.tokens"].data)
    shapes = {t.name: tuple(int(n) for n in t.shape[::-1]) for t in reader.tensors}
    assert shapes == shaped_gguf.tensor_shapes(dict(TINY, layers=2), len(source.fields["tokenizer.ggml.tokens"].data))
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"F16"}
    assert os.listdir(tmp_path) == ["tiny.f16.gguf"]  # no temporary file left

    checkpoint = str(tmp_path / "checkpoint")
    subprocess.run([sys.executable, "convert_llama_checkpoint.py", "--model-name", str(tmp_path), "--gguf-file",
                    "tiny.f16.gguf", "--save-path", checkpoint], cwd=os.path.join(ROOT, "Decentralized_FM_alpha"),
                   check=True, capture_output=True)
    model = LocalModel.from_checkpoint(checkpoint, "llama", dtype=torch.float32)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 160, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    # the converted weights are the file's values (v and the MLP are stored as they are; q and k
    # in llama.cpp's rotary order, which the converter undoes)
    for name, weight in (("blk.1.attn_v.weight", model.blocks[1].self_attn.v_proj.weight),
                         ("blk.0.ffn_down.weight", model.blocks[0].mlp.down_proj.weight)):
        stored = next(t for t in reader.tensors if t.name == name)
        assert torch.equal(weight, torch.from_numpy(stored.data.astype("float32")).reshape(weight.shape)), name
    assert torch.equal(model.blocks[1].post_attention_layernorm.weight, torch.ones(64))


def test_llama_cpp_loads_it(tmp_path, monkeypatch, template):
    pytest.importorskip("llama_cpp")
    monkeypatch.setitem(shaped_gguf.SHAPES, "tiny", TINY)
    path = shaped_gguf.write_shaped_gguf(template, str(tmp_path / "tiny.f16.gguf"), "tiny", progress=False)
    import gguf

    model = bench_peer.load_llama_cpp(path, 1, 64)
    assert model.n_embd() == 64
    assert model.n_vocab() == len(gguf.GGUFReader(template).fields["tokenizer.ggml.tokens"].data)
    assert len(bench_peer.llama_cpp_run(model, model.tokenize(b"Hello there"))(3)) == 3


def test_an_unknown_shape_or_layer_count_is_a_named_error():
    with pytest.raises(shaped_gguf.ShapeError, match="--shape 'llama-9b'"):
        shaped_gguf.shape_of("llama-9b")
    with pytest.raises(shaped_gguf.ShapeError, match="--shape-layers 0"):
        shaped_gguf.shape_of("llama-3.2-3b", 0)
    assert shaped_gguf.shape_of("llama-3.2-3b", 8)["layers"] == 8 and shaped_gguf.shape_of("llama-3.2-1b")["layers"] == 16


def test_the_default_predictor_width_is_upstreams_share_of_the_mlp():
    from support import matched_rank

    assert matched_rank(576, 1536) == 64 and matched_rank(3072, 8192) == 341  # SmolLM2; Llama-3.2-3B's widths
