"""Pieces shared by every model family: strict checkpoint loading, dtypes, masks, KV caches, taps,
and the MLP modules' base."""

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

TAP_NAMES = ("att_x", "mlp_x", "mlp_act", "head_out")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class CheckpointError(RuntimeError):
    """A per-layer checkpoint is missing, incomplete or does not fit the model config."""


def resolve_dtype(dtype):
    """Map a dtype name ("fp16", "bfloat16", ...) or a torch.dtype to a torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype name {dtype!r}; known: {', '.join(sorted(DTYPES))}") from None


def read_state_dict(path):
    """Load one checkpoint file lazily (mmap) with a message that names the file on failure."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def checkpoint_keys(module):
    """{state-dict key: the key the checkpoint file stores it under}. The per-layer files keep a
    block's MLP weights flat (gate_proj.weight, fc1.weight: the converters' and upstream's layout)
    while the block holds them in block.mlp: the one place the two namings meet."""
    flat = tuple(f"{name}." for name in getattr(module, "flat_in_checkpoint", ()))
    keys = {}
    for key in module.state_dict():
        prefix = next((p for p in flat if key.startswith(p)), "")
        keys[key] = key[len(prefix):]
    return keys


def load_strict(module, path, dtype=None, device=None):
    """Fill `module` (built on the meta device) from `path`, refusing any mismatch.

    Tensors are assigned, not copied into random-initialised parameters, so nothing can be
    left at random init: every parameter must be named in the file with the right shape.
    Errors name the file's keys (checkpoint_keys).
    """
    state = read_state_dict(path)
    keys = checkpoint_keys(module)
    module_key = {file_key: key for key, file_key in keys.items()}
    expected = {keys[key]: tensor for key, tensor in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {', '.join(unexpected)}")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key {key} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    dtype = resolve_dtype(dtype)
    if dtype is not None or device is not None:
        state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    module.load_state_dict({module_key[k]: v for k, v in state.items()}, strict=True, assign=True)
    return module


def build_from_checkpoint(cls, path, dtype=None, device=None, **kwargs):
    """Construct `cls(**kwargs)` without allocating weights, then load `path` strictly; on the
    CPU the weights are then copied into huge pages (decode/huge_pages.py)."""
    with torch.device("meta"):
        module = cls(**kwargs)
    load_strict(module, path, dtype=dtype, device=device)
    materialize = getattr(module, "materialize_buffers", None)
    if materialize is not None:
        materialize(device=device)
    if torch.device(device or "cpu").type == "cpu":
        from .decode.huge_pages import move_to_huge_pages

        move_to_huge_pages(module)  # decoding streams every weight each token: see huge_pages.py
    return module.eval()


def load_config(model_path, config_class):
    if not os.path.isdir(model_path):
        raise CheckpointError(f"model path is not a directory: {model_path}")
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"config file not found: {config_file}")
    return config_class.from_pretrained(model_path)


def past_length(layer_past):
    if layer_past is None:
        return 0
    if isinstance(layer_past, StaticKVCache):
        return layer_past.state.length
    return layer_past.length if isinstance(layer_past, KVCache) else layer_past[0].shape[2]


class _KVBuffers:
    """Preallocated keys and values [B, kv_heads, capacity, head_dim]; `filled` positions written."""

    def __init__(self, like_k, like_v, capacity):
        batch, heads, _, _ = like_k.shape
        self.keys = like_k.new_empty(batch, heads, capacity, like_k.shape[-1])
        self.values = like_v.new_empty(batch, heads, capacity, like_v.shape[-1])
        self.filled = 0


class KVCache:
    """One layer's KV cache: the first `length` positions of preallocated buffers.

    `append` writes the new positions in place, so a decoding step copies one token's keys and
    values instead of the whole cache (as torch.cat would); the buffers double when full. It
    returns a new KVCache and leaves this one valid: appending to an older cache (a branch)
    copies instead of overwriting positions a newer cache holds. Indexing gives (keys, values)
    like the tuples transformers uses.
    """

    def __init__(self, buffers, length):
        self.buffers, self.length = buffers, length

    @property
    def keys(self):
        return self.buffers.keys[:, :, : self.length]

    @property
    def values(self):
        return self.buffers.values[:, :, : self.length]

    def __getitem__(self, index):
        return (self.keys, self.values)[index]

    def __len__(self):
        return 2

    def grown(self, count):
        """The cache with `count` more positions, still to be written into `buffers` (at
        [length - count, length)) by the caller."""
        end = self.length + count
        buffers = self.buffers
        if buffers.filled != self.length or end > buffers.keys.shape[2]:
            buffers = _KVBuffers(buffers.keys, buffers.values, max(2 * end, end + 64))
            buffers.keys[:, :, : self.length] = self.keys
            buffers.values[:, :, : self.length] = self.values
        buffers.filled = end
        return KVCache(buffers, end)

    def append(self, k, v):
        """The cache with k, v [B, kv_heads, S, head_dim] added after this one's positions."""
        present = self.grown(k.shape[2])
        present.buffers.keys[:, :, self.length : present.length] = k
        present.buffers.values[:, :, self.length : present.length] = v
        return present


class StaticDecodeState:
    """What a static-cache decoding step reads besides its token, shared by a stage's layers.

    positions [B, 1]: each row's position of the token being decoded (left padding not counted);
    write_index [1]: the cache slot the token's keys and values go to;
    key_valid [B, capacity]: the slots each row's query may see (`allowed` is its SDPA view);
    length: slots written so far. The step reads these, never Python numbers, so the same
    kernels with the same addresses serve every step: it can be captured once as a CUDA graph.
    """

    def __init__(self, batch, capacity, device):
        self.capacity = capacity
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.allowed = self.key_valid[:, None, None, :]
        self.length = 0
        self.decoding = False

    def reset(self):
        self.key_valid.zero_()
        self.positions.zero_()
        self.length, self.decoding = 0, False

    def prompt_done(self, mask, length):
        """After the prompt step: `length` slots written, `mask` [B, length] (None: all real)."""
        if mask is None:
            self.key_valid[:, :length] = True
            self.positions.fill_(length)
        else:
            self.key_valid[:, :length] = mask[:, -length:].bool()
            self.positions.copy_(mask[:, -length:].long().sum(-1, keepdim=True))
        self.length, self.decoding = length, True

    def begin_token(self):
        if self.length >= self.capacity:
            raise ValueError(f"the static KV cache is full: it holds {self.capacity} positions")
        self.write_index.fill_(self.length)
        self.key_valid[:, self.length] = True

    def end_token(self):
        self.positions += 1
        self.length += 1


class StaticKVCache:
    """One layer's keys and values in buffers of fixed capacity [B, kv_heads, capacity, head_dim],
    allocated (zeroed: masked slots must not hold NaN) at the first write. A prompt is written in
    place at [length, length + S); a decoding token at state.write_index, and attention then reads
    every slot under state.allowed. Returned as its own `present`."""

    def __init__(self, state):
        self.state = state
        self.keys = self.values = None

    def update(self, k, v):
        """(self, keys, values) to attend over after writing k, v [B, kv_heads, S, head_dim]."""
        if self.keys is None:
            batch, heads, _, dim = k.shape
            self.keys = k.new_zeros(batch, heads, self.state.capacity, dim)
            self.values = v.new_zeros(batch, heads, self.state.capacity, v.shape[-1])
        if self.state.decoding and k.shape[2] == 1:
            self.keys.index_copy_(2, self.state.write_index, k)
            self.values.index_copy_(2, self.state.write_index, v)
            return self, self.keys, self.values
        start, end = self.state.length, self.state.length + k.shape[2]
        if end > self.state.capacity:
            raise ValueError(f"the static KV cache holds {self.state.capacity} positions; {end} asked for")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self, self.keys[:, :, :end], self.values[:, :, :end]


def cache_geometry(layer_past, mask, seq_len, device):
    """(positions [B, S], attention mask) of a step: a static cache's decoding step reads them
    from its state's tensors; every other step computes them (step_geometry)."""
    if isinstance(layer_past, StaticKVCache) and layer_past.state.decoding and seq_len == 1:
        return layer_past.state.positions, layer_past.state.allowed
    return step_geometry(mask, past_length(layer_past), seq_len, device)


def extend_cache(layer_past, k, v):
    """(present, all keys, all values): `layer_past` (None, a KVCache, a StaticKVCache or a
    (k, v) pair) plus k, v."""
    if isinstance(layer_past, StaticKVCache):
        return layer_past.update(k, v)
    if layer_past is None:
        cache = KVCache(_KVBuffers(k, v, k.shape[2] + 64), 0)
    elif isinstance(layer_past, KVCache):
        cache = layer_past
    else:
        cache = KVCache(_KVBuffers(k, v, 0), 0).append(*layer_past)
    present = cache.append(k, v)
    return present, present.keys, present.values


def positions_from_mask(mask, past_len, seq_len, device):
    """Position ids [B, S]: from the mask (cumsum - 1) so left padding does not shift them."""
    if mask is None:
        return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, past_len : past_len + seq_len]


def attention_mask(mask, past_len, seq_len, device):
    """Boolean [B or 1, 1, S, past+S] mask of the keys each query may see (None if all).

    Causal, minus left padding. A padded query still sees itself so its softmax is defined;
    its output is never used.
    """
    if mask is None and seq_len == 1:
        return None
    total = past_len + seq_len
    query_index = torch.arange(past_len, total, device=device)[:, None]
    key_index = torch.arange(total, device=device)[None, :]
    allowed = (key_index <= query_index)[None, None]
    if mask is not None:
        real_keys = mask[:, None, None, :total].bool()
        allowed = (allowed & real_keys) | (key_index == query_index)[None, None]
    return allowed


def version_of(tensor):
    """The in-place version counter, or None for inference-mode tensors (they keep none)."""
    return None if tensor.is_inference() else tensor._version


def tensor_key(tensor):
    return None if tensor is None else (id(tensor), version_of(tensor), tuple(tensor.shape))


class StepCache:
    """One remembered value: what every layer of a forward step would otherwise recompute.

    Keys may hold tensor ids (tensor_key); the cache keeps those tensors alive, so an id
    cannot be reused by another tensor while its entry is cached.
    """

    instances = []  # every StepCache, for forget_step_caches

    def __init__(self):
        self.key, self.value, self.held = None, None, None
        StepCache.instances.append(self)

    def get(self, key, compute, held):
        if self.key != key:
            self.key, self.value, self.held = key, compute(), held
        return self.value


_geometry_cache, _token_mask_cache = StepCache(), StepCache()


def forget_step_caches():
    """Empty every StepCache, so the next step computes its shared values again: a CUDA graph
    capture must record those computations, not reuse tensors an earlier eager step made."""
    for cache in StepCache.instances:
        cache.key = cache.value = cache.held = None


def step_geometry(mask, past_len, seq_len, device):
    """(positions [B, S], attention mask) of one forward step, computed once for all its layers."""
    return _geometry_cache.get(
        (tensor_key(mask), past_len, seq_len, str(device)),
        lambda: (positions_from_mask(mask, past_len, seq_len, device), attention_mask(mask, past_len, seq_len, device)),
        mask,
    )


def token_mask_of(mask, seq_len):
    """The [B, S] real-token mask of the current step (once per step), or None if every token is real."""
    if mask is None:
        return None
    return _token_mask_cache.get((tensor_key(mask), seq_len), lambda: mask[:, -seq_len:].bool(), mask)


class CheckpointPart(nn.Module):
    """A pipeline part read from its own file of a converted checkpoint (formats.md):
    Part.from_pretrained(model_path, config=None, dtype=None, device=None); a block also takes
    layer_index. `config` defaults to the folder's config.json read with config_class."""

    config_class = None  # the family's transformers config class
    checkpoint_file = None  # the part's file in the folder; blocks fill in {layer_index}

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(cls, model_path, config=None, dtype=None, device=None, **kwargs):
        config = config or load_config(model_path, cls.config_class)
        path = os.path.join(model_path, cls.checkpoint_file.format(**kwargs))
        return build_from_checkpoint(cls, path, dtype=dtype, device=device, config=config, **kwargs)


class DenseMLP(nn.Module):
    """Base of the families' MLP modules (block.mlp, as transformers' LlamaMLP): output(activation(h)).
    The two halves are apart so that the block can tap the activation between them;
    neuron_linears() names the weights per neuron for the sparse MLPs and the kernels."""

    def forward(self, h):
        return self.output(self.activation(h))


class TappedModule(CheckpointPart):
    """Base of every dense block: the four taps are identity here.

    The save variant overrides `tap` to record; sparse execution installs an object at `taps`
    (called at every tap) and replaces block.mlp. Neither copies the dense forward.
    """

    checkpoint_file = "pytorch_{layer_index}.pt"
    taps = None  # what sparse execution installs: taps(name, value, token_mask) -> value
    flat_in_checkpoint = ("mlp",)  # submodules whose weights the per-layer files store without prefix

    @classmethod
    def from_pretrained(cls, model_path, config=None, layer_index=0, dtype=None, device=None):
        return super().from_pretrained(model_path, config, dtype, device, layer_index=layer_index)

    def tap(self, name, value, token_mask):
        taps = self.taps
        return value if taps is None else taps(name, value, token_mask)

    def attend(self, h, layer_past, mask, token_mask):
        """(output, present) of the block's attention on h: the step sparse execution offers for
        the kept heads only (taps.attention_step, CUDA decoding), where it applies, else the
        family's own `attention`."""
        step = getattr(self.taps, "attention_step", None)
        sparse = None if step is None else step(self, h, layer_past, mask, token_mask)
        return self.attention(h, layer_past, mask, token_mask) if sparse is None else sparse

    def feed_forward(self, h, token_mask):
        """block.mlp on h. A dense MLP's activation passes the mlp_act tap on its way to the
        output projection; an MLP put in its place (sparse execution) computes its own way."""
        mlp = self._modules["mlp"]
        if isinstance(mlp, DenseMLP):
            return mlp.output(self.tap("mlp_act", mlp.activation(h), token_mask))
        return mlp(h)
