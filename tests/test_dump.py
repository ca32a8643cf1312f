"""Activation dumps: content against transformers' hooks, alignment, capacity, resume, crashes."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from dump_helpers import assert_dump_matches, collect, hf_reference_taps, read_dump, read_meta
from dejavu_llama.modules.activation_dump import DumpError
from tiny_models import tiny_llama, tiny_opt


def ids(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dump_rows_equal_transformers_activations(tmp_path, family):
    hf_model, checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)
    input_ids = ids(2, 11, seed=1)
    meta = collect(checkpoint, f"{family}-save", tmp_path / "dump", [(input_ids, None)])
    assert meta["rows"] == {str(l): 22 for l in range(3)} and meta["complete"] and meta["tokens"] == 22
    assert (meta["hidden_size"], meta["num_heads"]) == (48, hf_model.config.num_attention_heads)
    reference = hf_reference_taps(hf_model, input_ids, family)
    assert_dump_matches(tmp_path / "dump", reference, range(3))


def test_smollm2_dump_matches_transformers(tmp_path, smollm2_checkpoint, smollm2_hf, smollm2_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Boston is the capital of Massachusetts."
    input_ids = smollm2_tokenizer(text, return_tensors="pt").input_ids
    meta = collect(smollm2_checkpoint, "llama-save", tmp_path / "dump", [(input_ids, None)])
    assert meta["intermediate_size"] == 1536 and meta["num_heads"] == 9 and len(meta["layers"]) == 30
    reference = hf_reference_taps(smollm2_hf, input_ids, "llama")
    assert_dump_matches(tmp_path / "dump", reference, [0, 1, 10, 29])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_left_padded_batch_dumps_only_real_tokens(tmp_path, family):
    hf_model, checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)
    rows = [ids(1, 9, seed=2)[0], ids(1, 4, seed=3)[0], ids(1, 6, seed=4)[0]]
    input_ids = torch.ones(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    meta = collect(checkpoint, f"{family}-save", tmp_path / "dump", [(input_ids, mask)])
    assert meta["tokens"] == 9 + 4 + 6
    # Each prompt's rows equal the activations of that prompt run alone, in order.
    start = 0
    for row in rows:
        reference = hf_reference_taps(hf_model, row[None], family)
        assert_dump_matches(tmp_path / "dump", reference, range(3), rows=slice(start, start + len(row)))
        start += len(row)


def test_layer_subset_dumps_only_those_layers(tmp_path):
    """--sp-layers: the chosen layers' files hold the same rows as a full dump; no other files."""
    from sparse_predictor.dump_reader import DumpReader

    _, checkpoint = tiny_llama(tmp_path)
    batches = [(ids(2, 7, seed=5), None), (ids(1, 5, seed=6), None)]
    collect(checkpoint, "llama-save", tmp_path / "full", batches)
    meta = collect(checkpoint, "llama-save", tmp_path / "subset", batches, layers="0,2")
    assert meta["layers"] == [0, 2] and meta["rows"] == {"0": 19, "2": 19} and meta["complete"]
    assert sorted(name for name in os.listdir(tmp_path / "subset") if name.endswith(".mmap")) == sorted(
        f"{kind}_{layer}.mmap" for kind in ("att_x", "mlp_x", "mlp_label", "att_label") for layer in (0, 2))
    reader = DumpReader(str(tmp_path / "subset"))
    assert reader.layers == [0, 2] and reader.rows_for([0, 2]) == 19
    for kind in ("att_x", "mlp_x", "mlp_label", "att_label"):
        for layer in (0, 2):
            assert torch.equal(read_dump(tmp_path / "subset", kind, layer), read_dump(tmp_path / "full", kind, layer))
    with pytest.raises(DumpError, match="--sp-layers"):
        collect(checkpoint, "llama-save", tmp_path / "bad", batches, layers="5")


def test_rows_align_across_layers(tmp_path):
    """The same token sits at the same row in every layer: layer l+1's input is layer l's output."""
    _, checkpoint = tiny_llama(tmp_path)
    batches = [(ids(2, 7, seed=s), None) for s in range(3)]
    collect(checkpoint, "llama-save", tmp_path / "dump", batches)
    from dejavu_llama.modules.local_model import LocalModel

    model = LocalModel.from_checkpoint(checkpoint, "llama")
    for layer in range(2):
        block = model.blocks[layer]
        x = read_dump(tmp_path / "dump", "att_x", layer)
        nxt = read_dump(tmp_path / "dump", "att_x", layer + 1)
        # Recompute layer output per batch (7 tokens per row, 2 rows per batch).
        outputs = []
        for b in range(3):
            chunk = x[b * 14:(b + 1) * 14].reshape(2, 7, -1)
            with torch.no_grad():
                outputs.append(block(chunk)[0].reshape(14, -1))
        assert (torch.cat(outputs) - nxt).abs().max() < 2e-2


def test_capacity_stops_dumping_cleanly(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    batches = [(ids(1, 10, seed=s), None) for s in range(4)]
    meta = collect(checkpoint, "llama-save", tmp_path / "dump", batches, capacity=25)
    assert meta["capacity_reached"] and meta["complete"]
    assert all(n == 25 for n in meta["rows"].values())
    # File sizes are exactly capacity x width: nothing written past the end.
    assert os.path.getsize(tmp_path / "dump" / "att_x_0.mmap") == 25 * 48 * 2


def test_resume_appends_after_recorded_rows(tmp_path):
    hf_model, checkpoint = tiny_llama(tmp_path)
    first, second = ids(1, 8, seed=7), ids(1, 5, seed=8)
    collect(checkpoint, "llama-save", tmp_path / "dump", [(first, None)], capacity=100)
    meta = collect(checkpoint, "llama-save", tmp_path / "dump", [(second, None)], capacity=100, resume=True)
    assert meta["tokens"] == 13
    for rows, prompt in ((slice(0, 8), first), (slice(8, 13), second)):
        assert_dump_matches(tmp_path / "dump", hf_reference_taps(hf_model, prompt, "llama"), range(3), rows=rows)


def test_different_model_in_folder_is_refused(tmp_path):
    _, checkpoint = tiny_llama(tmp_path, name="a")
    _, other = tiny_llama(tmp_path, name="b", hidden_size=72)
    collect(checkpoint, "llama-save", tmp_path / "dump", [(ids(1, 4, seed=1), None)])
    with pytest.raises(DumpError, match="different model"):
        collect(other, "llama-save", tmp_path / "dump", [(ids(1, 4, seed=1), None)])
    meta = collect(other, "llama-save", tmp_path / "dump", [(ids(1, 4, seed=1), None)], force=True)
    assert meta["hidden_size"] == 72


def test_the_same_checkpoint_under_another_spelling_is_the_same_model(tmp_path, monkeypatch):
    """A dump made with a relative checkpoint path is resumed with the absolute one (and through
    a symlink): the same model, not a different one."""
    hf_model, checkpoint = tiny_llama(tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(checkpoint, tmp_path)
    link = tmp_path / "linked"
    link.symlink_to(checkpoint, target_is_directory=True)
    collect(relative, "llama-save", tmp_path / "dump", [(ids(1, 6, seed=2), None)], capacity=100)
    collect(os.path.abspath(checkpoint) + os.sep, "llama-save", tmp_path / "dump", [(ids(1, 4, seed=3), None)],
            capacity=100, resume=True)
    meta = collect(str(link), "llama-save", tmp_path / "dump", [(ids(1, 5, seed=4), None)], capacity=100,
                   resume=True)
    assert meta["tokens"] == 15


KILLED_COLLECTOR = r"""
import sys, torch
from dump_helpers import collect_args
from dejavu_llama.modules.local_model import LocalModel
import dejavu_llama.modules.hf_llama_module_save as save
model = LocalModel.from_checkpoint(sys.argv[1], "llama-save")
writer = save.prepare_stage(list(model.blocks), collect_args(sys.argv[2], sys.argv[1], "llama-save", 10000, num_layers=3), model.config)
for step in range(10000):
    model(torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(step)))
    print("batch", step, flush=True)
"""


def test_killed_run_leaves_consistent_meta(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    folder = tmp_path / "dump"
    tests_dir = os.path.dirname(__file__)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_COLLECTOR, checkpoint, str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=tests_dir,
    )
    try:
        for line in process.stdout:
            if line.startswith("batch 5"):
                break
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    meta = read_meta(folder)
    assert not meta["complete"]
    rows = meta["tokens"]
    assert rows >= 60 and rows % 10 == 0 and len(set(meta["rows"].values())) == 1
    # Every counted row was written: batch k's tokens sit at rows 10k..10k+9.
    from dejavu_llama.modules.local_model import LocalModel

    model = LocalModel.from_checkpoint(checkpoint, "llama")
    last = rows // 10 - 1
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(last))
    with torch.no_grad():
        expected = model.embeddings(prompt)[0]
    assert (read_dump(folder, "att_x", 0)[last * 10:rows] - expected).abs().max() < 1e-2
    # And a resumed run continues right after.
    meta = collect(checkpoint, "llama-save", folder, [(ids(1, 3, seed=1), None)], capacity=10000, resume=True)
    assert meta["tokens"] == rows + 3 and meta["complete"]


def test_two_stage_pipeline_dump_equals_one_stage_and_transformers(tmp_path):
    """llama-save through the real runner: layers split over 2 gloo stages write the same rows.

    Prompts of different lengths share a batch (left padding); each prompt's tokens must sit at
    the same rows of every file of every layer, whichever stage wrote the layer.
    """
    from test_pipeline_support import run_in_process, run_pipeline, runner_args, write_requests
    from transformers import AutoTokenizer

    hf_model, checkpoint = tiny_llama(tmp_path, num_hidden_layers=4)
    prompts = ["w5 w17 w200 w3 w9", "w40 w41", "w9 w10 w11 w12 w13 w14 w15 w16 w30", "w7 w8 w9", "w120 w3 w44 w81"]
    requests = write_requests(tmp_path / "requests.jsonl",
                              [{"prompt": p, "max_tokens": 0, "echo": True, "logprobs": 1} for p in prompts])
    flags = ["--batch-size", "3", "--sp-rows", "1000"]
    one, two = tmp_path / "dump1", tmp_path / "dump2"
    pipeline_flags = [*flags, "--sp-data-path", str(two), "--num-layers", "2", "--max-layers", "4"]
    run_pipeline(runner_args(checkpoint, "llama-save", requests, tmp_path / "out2.jsonl", pipeline_flags),
                 2, tmp_path, "save2")
    assert run_in_process(runner_args(checkpoint, "llama-save", requests, tmp_path / "out1.jsonl",
                                      [*flags, "--sp-data-path", str(one)])) == 0

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    meta = read_meta(two)
    assert meta["complete"] and meta["rows"] == {str(l): sum(lengths) for l in range(4)}
    for layer in range(4):
        for kind in ("att_x", "mlp_x", "mlp_label", "att_label"):
            # Equal up to float16 rounding (the runs differ in thread count); a shifted row would not be.
            torch.testing.assert_close(read_dump(two, kind, layer), read_dump(one, kind, layer), rtol=4e-3, atol=1e-3,
                                       msg=f"{kind} layer {layer}")
    start = 0
    for prompt, length in zip(prompts, lengths):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        reference = hf_reference_taps(hf_model, input_ids, "llama")
        assert_dump_matches(two, reference, range(4), rows=slice(start, start + length))
        start += length


def test_a_full_disk_is_a_clear_error_and_the_rows_before_it_stay(tmp_path, monkeypatch):
    """Disk blocks are reserved ahead of the rows; when the disk is full the collection stops with
    an error naming the file, and meta.json counts the rows written before it, which hold the
    right values (instead of the process dying of SIGBUS on a page with no block)."""
    import dejavu_llama.modules.activation_dump as activation_dump
    import dejavu_llama.modules.hf_llama_module_save as save
    from dejavu_llama.modules.local_model import LocalModel
    from dump_helpers import collect_args

    _, checkpoint = tiny_llama(tmp_path)
    folder = tmp_path / "dump"
    reserved = []
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        if len(reserved) == 3 * 4:  # the first reservation of 3 layers x 4 files went through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        reserved.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(activation_dump, "RESERVE_ROWS", 16)
    model = LocalModel.from_checkpoint(checkpoint, "llama-save")
    writer = save.prepare_stage(list(model.blocks), collect_args(folder, checkpoint, "llama-save", 1000, num_layers=3),
                                model.config)
    prompts = [ids(1, 10, seed=s) for s in range(3)]
    with pytest.raises(DumpError, match=r"att_x_0\.mmap: no space left on the device for rows 16-"):
        for prompt in prompts:
            model(prompt)
    writer.close(False)  # as the runner does on an error
    assert all(offset == 0 for offset, _ in reserved)
    meta = read_meta(folder)
    assert not meta["complete"] and meta["tokens"] == 10 and set(meta["rows"].values()) == {10}
    with torch.no_grad():
        expected = LocalModel.from_checkpoint(checkpoint, "llama").embeddings(prompts[0])[0]
    assert (read_dump(folder, "att_x", 0)[:10] - expected).abs().max() < 1e-2
