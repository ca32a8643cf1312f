"""Token choice on the last stage: greedy, or sampling with temperature, top-k and top-p."""

import torch


def filter_top_k_top_p(logits, top_k=0, top_p=1.0):
    """Set to -inf the logits outside the top-k and outside the top-p nucleus (1-D logits)."""
    logits = logits.clone()
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the probability mass before it already reaches top_p.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop[0] = False
        logits[order[drop]] = float("-inf")
    return logits


class TokenSampler:
    """Chooses one token per row from float32 logits [rows, V]; seeded for reproducibility.

    Sampling draws on the CPU from one generator, in row order, so a run with any number of
    pipeline stages draws the same tokens.
    """

    def __init__(self, seed=42):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def choose(self, logits, settings):
        """`settings`: per row (temperature, top_p, top_k). Returns LongTensor [rows]."""
        chosen = logits.argmax(-1)
        for row, (temperature, top_p, top_k) in enumerate(settings):
            if temperature <= 0:
                continue
            scaled = filter_top_k_top_p(logits[row].float().cpu() / temperature, top_k, top_p)
            probs = torch.softmax(scaled, dim=-1)
            chosen[row] = torch.multinomial(probs, 1, generator=self.generator).item()
        return chosen
