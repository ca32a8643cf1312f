"""The generation loop over a stage (stages.py): left padding, one decoding step, the loop.

    ids, mask = left_pad(prompts, pad_id, device)
    stage = model.stage_pool(backend, device).stage(batch, length + max_new_tokens)
    tokens, lengths = generate(stage, embed, head, greedy, ids, mask, max_new_tokens, stop)

`generate` runs the prompt through `stage.prefill`, then one `stage.decode` per new token,
extending the mask by one real position each time, until every row has stopped or
max_new_tokens tokens are out. LocalModel.generate_greedy and the lm-eval adapter use it; the
pipeline engine, whose stages sit on different ranks, uses `left_pad` and `decode_step` (one
stage's side of a step) between its transfers.
"""

import torch


def left_pad(rows, pad_id=0, device=None, always_mask=False):
    """(ids [B, longest], mask [B, longest]) of token-id lists, padded on the left with `pad_id`.
    The mask is None when no row is padded, unless `always_mask` (the pipeline engine's stages
    derive their shapes from it)."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[index, longest - len(row):] = 1
    if not always_mask and bool(mask.all()):
        mask = None
    return ids.to(device), (None if mask is None else mask.to(device))


def greedy(logits):
    """The highest-scoring token per row: logits [B, V] -> tokens [B, 1]."""
    return logits.argmax(-1, keepdim=True)


def sampler(temperature, generator):
    """A chooser drawing one token per row from softmax(logits / temperature), on the CPU from
    `generator` (so a run draws the same tokens on any device)."""

    def sample(logits):
        probs = torch.softmax(logits.float() / float(temperature), dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).to(logits.device)

    return sample


def decode_step(stage, inputs, mask, embed=None, head=None):
    """One new token per row through one stage: `embed(tokens, past_layer, mask)` on the first
    stage (`inputs` are the tokens [B, 1]; else the previous stage's hidden states [B, 1, d]),
    the stage's blocks (`stage.decode`), then `head(hidden)` on the last stage. Returns what
    `head` returns, or the hidden states for the next stage when there is no head."""
    x = inputs if embed is None else embed(inputs, stage.first_cache, mask)
    x = stage.decode(x, mask)
    return x if head is None else head(x)


@torch.inference_mode()
def generate(stage, embed, head, choose, input_ids, mask, max_new_tokens, stop=None):
    """Up to max_new_tokens tokens per row through `stage`, which holds all the blocks.

    embed(ids, past_layer, mask) -> hidden states; head(hidden [B, S, d]) -> logits [B, S, V];
    choose(logits [B, V]) -> tokens [B, 1] (greedy, sampler(...)); stop(row, tokens) -> True
    when the row is done, `tokens` being the row's new tokens so far (a list of ints). Every
    row gets a token at every step (the batch decodes together) until all rows have stopped.

    Returns (tokens [B, n], lengths): n the number of steps run, lengths[row] the number of the
    row's tokens up to and including the one its stop rule ended it at (n if it never did).
    """
    rows = input_ids.shape[0]

    def next_tokens(hidden):
        return choose(head(hidden[:, -1:])[:, -1])

    tokens = next_tokens(stage.prefill(embed(input_ids, None, mask), mask)) if max_new_tokens > 0 else None
    chosen, lengths = [], [None] * rows
    generated = [[] for _ in range(rows)] if stop is not None else None
    for step in range(max_new_tokens):
        chosen.append(tokens)
        if stop is not None:
            for row, token in enumerate(tokens[:, 0].tolist()):
                if lengths[row] is None:
                    generated[row].append(token)
                    if stop(row, generated[row]):
                        lengths[row] = step + 1
            if all(length is not None for length in lengths):
                break
        if step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(tokens, dtype=mask.dtype)), dim=1)
        tokens = decode_step(stage, tokens, mask, embed, next_tokens)
    out = torch.cat(chosen, dim=1) if chosen else input_ids.new_zeros(rows, 0)
    return out, [out.shape[1] if length is None else length for length in lengths]
