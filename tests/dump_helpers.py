"""Collect activation dumps in-process with the save model types, and the transformers reference."""

import json
import os
from types import SimpleNamespace

import numpy as np
import torch

from dejavu_common.dump_format import TAPS, dump_file
from dejavu_llama.modules.local_model import LocalModel


def collect_args(folder, model_path, model_type, capacity=1000, resume=False, force=False, num_layers=None,
                 commit_seconds=0.0, layers="all"):
    return SimpleNamespace(
        sp_data_path=str(folder), sp_rows=capacity, sp_resume=resume, sp_force=force, sp_commit_seconds=commit_seconds,
        sp_layers=layers,
        model_name=str(model_path), model_type=model_type, infer_data="test", pipeline_group_size=1,
        num_layers=num_layers, rank=0,
    )


def collect(model_path, model_type, folder, batches, capacity=1000, resume=False, force=False, layers="all"):
    """Run each (input_ids, mask) batch through a save model; returns the meta.json written."""
    model = LocalModel.from_checkpoint(model_path, model_type)
    module = __import__("dejavu_llama.pipeline_parallel.model_registry", fromlist=["x"]).load_model_module(model_type)
    args = collect_args(folder, model_path, model_type, capacity, resume, force, len(model.blocks), layers=layers)
    writer = module.prepare_stage(list(model.blocks), args, model.config)
    try:
        for input_ids, mask in batches:
            model(input_ids, mask=mask)
    finally:
        writer.close(True)
    return read_meta(folder)


def read_meta(folder):
    with open(os.path.join(folder, "meta.json")) as handle:
        return json.load(handle)


def read_dump(folder, kind, layer):
    meta = read_meta(folder)
    width = {"att_x": meta["hidden_size"], "mlp_x": meta["hidden_size"],
             "mlp_label": meta["intermediate_size"], "att_label": meta["num_heads"]}[kind]
    array = np.memmap(dump_file(folder, kind, layer), dtype=np.float16, mode="r", shape=(meta["capacity"], width))
    return torch.from_numpy(np.array(array[: meta["rows"][str(layer)]])).float()


def hf_reference_taps(hf_model, input_ids, family):
    """{(kind, layer): [B*S, width]} captured with forward hooks on transformers' model."""
    captured = {}
    layers = hf_model.model.layers if family == "llama" else hf_model.model.decoder.layers
    config = hf_model.config
    heads = config.num_attention_heads
    handles = []

    def keep(kind, layer, transform=lambda t: t):
        def hook(module, args, kwargs=None):
            tensor = args[0] if args else kwargs["hidden_states"]
            captured[kind, layer] = transform(tensor.detach()).reshape(-1, transform(tensor).shape[-1])
        return hook

    def head_norms(t):
        return t.reshape(*t.shape[:-1], heads, -1).norm(dim=-1)

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(keep("att_x", index), with_kwargs=True))
        if family == "llama":
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(keep("mlp_x", index)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(keep("mlp_label", index)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep("att_label", index, head_norms)))
        else:
            handles.append(layer.final_layer_norm.register_forward_pre_hook(keep("mlp_x", index)))
            handles.append(layer.fc2.register_forward_pre_hook(keep("mlp_label", index)))
            handles.append(layer.self_attn.out_proj.register_forward_pre_hook(keep("att_label", index, head_norms)))
    try:
        with torch.no_grad():
            hf_model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def assert_dump_matches(folder, reference, layers, rows=None):
    for layer in layers:
        for kind in TAPS:
            dumped = read_dump(folder, kind, layer)
            expected = reference[kind, layer].float()
            if rows is not None:
                dumped = dumped[rows]
            assert dumped.shape == expected.shape, (kind, layer, dumped.shape, expected.shape)
            tolerance = 2e-3 * expected.abs().max().item() + 1e-3  # float16 storage
            diff = (dumped - expected.half().float()).abs().max().item()
            assert diff <= tolerance, f"{kind} layer {layer}: {diff} > {tolerance}"
