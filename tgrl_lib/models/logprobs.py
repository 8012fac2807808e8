"""The log-prob kernel: per-token log p (and entropy) of response tokens, memory-lean and prefix-shared.

- `response_logprobs`: log p(token) of every response token, and optionally the policy entropy there.
  Only the positions that predict response tokens get logits (`logits_to_keep`), and the log-softmax is
  never materialised: `token_logprob_entropy` computes `z[y] - logsumexp(z)` in fp32 chunks and its
  backward recomputes the softmax chunk by chunk, so the only [N, V] tensors are the logits themselves and
  their gradient (TRL's `selective_log_softmax` has the same goal; the custom backward is ours).
- `shared_prefix_logprobs`: the same log-probs with each group's shared prompt encoded once (prefix KV
  cache copied to its rows): the update's passes at about half the work.
- `mean_logprobs`: the mean token log-prob of whole responses, the policy-likelihood score that the
  trajectory filter and the trainer's in-loop filter share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tgrl_lib.errors import TgrlError
from tgrl_lib.models.collate import SequenceBatch, collate_sequences


# ------------------------------------------------------------------------------------- log-probs
class _TokenLogProbEntropy(torch.autograd.Function):
    """logp[n] = z[n, y_n] - logsumexp(z[n]) and H[n] = -sum_v p log p, in chunks of rows; the backward
    recomputes softmax per chunk: dlogp/dz = onehot(y) - p, dH/dz = -p * (log p + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, with_entropy: bool, chunk: int):  # [N, V], [N]
        compute = torch.promote_types(logits.dtype, torch.float32)
        N = logits.shape[0]
        lse = logits.new_empty(N, dtype=compute)  # [N]
        logp = logits.new_empty(N, dtype=compute)  # [N]
        entropy = logits.new_zeros(N, dtype=compute)  # [N]
        for s in range(0, N, chunk):
            z = logits[s : s + chunk].to(compute)  # [n, V]
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(-1, target[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            if with_entropy:
                p = torch.exp(z - lse[s : s + chunk, None])  # [n, V]
                entropy[s : s + chunk] = lse[s : s + chunk] - (p * z).sum(-1)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.chunk = chunk
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        logits, target, lse, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # [N, V]
        for s in range(0, logits.shape[0], ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            log_p = logits[rows].to(lse.dtype) - lse[rows, None]  # [n, V]
            p = torch.exp(log_p)
            g = torch.zeros_like(p)
            if grad_logp is not None:
                g -= p * grad_logp[rows, None]
                g.scatter_add_(-1, target[rows, None], grad_logp[rows, None].to(g.dtype))
            if grad_entropy is not None:
                g -= p * (log_p + entropy[rows, None]) * grad_entropy[rows, None]
            grad[rows] = g.to(grad.dtype)
        return grad, None, None, None


def token_logprob_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk_elements: int = 2**25,
) -> tuple[Tensor, Tensor]:
    """Per-row log-prob of `target` and entropy of softmax(`logits` / `temperature`), both fp32 (fp64 for
    fp64 logits). logits [N, V], target [N] -> ([N], [N]); entropy is zeros unless `with_entropy`.
    A temperature other than 1 scores under the distribution a rollout at that temperature samples from
    (pure temperature sampling: no top-k / top-p), at the cost of one scaled copy of the logits."""
    if temperature <= 0:
        raise TgrlError(f"log-probs need a temperature > 0, got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature
    chunk = max(1, chunk_elements // max(1, logits.shape[-1]))
    return _TokenLogProbEntropy.apply(logits, target, with_entropy, chunk)


def response_logprobs(
    model: Any, batch: SequenceBatch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None]:
    """log p(token | prefix, image) on every response token, [B, T] aligned with `response_mask` (0
    elsewhere), and the policy entropy at those tokens ([B, T], or None), both of the policy at
    `temperature` (logits / temperature). Differentiable when grad is on."""
    mask = batch.response_mask.bool()  # [B, T]
    B, T = mask.shape
    logprobs = torch.zeros((B, T), dtype=torch.float32, device=mask.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    if not mask.any():
        return logprobs, entropy
    first = int(mask.float().argmax(-1)[mask.any(-1)].min())  # first response column of any row
    if first == 0:
        raise TgrlError("a response starts at position 0: every sequence needs a prompt before its response")
    out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=T - first + 1)
    logits = out.logits[:, :-1]  # [B, T - first, V]  position t predicts token t + 1
    predicted = mask[:, first:]  # [B, T - first]
    lp, ent = token_logprob_entropy(
        logits[predicted],
        batch.input_ids[:, first:][predicted],
        with_entropy=with_entropy,
        temperature=temperature,
    )  # [N], [N]
    logprobs = logprobs.to(lp.dtype).masked_scatter(mask, lp)
    if entropy is not None:
        entropy = entropy.to(ent.dtype).masked_scatter(mask, ent)
    return logprobs, entropy


def shared_prefix_logprobs(
    model: Any, batch: SequenceBatch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None] | None:
    """`response_logprobs` with each distinct prompt (tokens and image) encoded once.

    The G rows of a group share their prompt, which is most of a sequence, so this runs the distinct
    prompts (minus their last token) once with a KV cache, copies the cache to the rows, and continues
    every row from its last prompt token through its response, with the 3D (M-RoPE) positions the full
    forward would use. Same values as `response_logprobs` up to float rounding (~1e-6 on the tiny
    model), about half its work at G=8; differentiable when grad is on (the copied cache sums its rows'
    gradients into the shared prompt). Two forwards per call: pass an unwrapped model (DDP wants one
    forward per backward). Returns None when this does not apply (no shared prompt, no image, a model
    without `get_rope_index`, image tokens after the prompt): use `response_logprobs`."""
    core = getattr(model, "model", None)
    if batch.pixel_values is None or batch.image_grid_thw is None or batch.mm_token_type_ids is None:
        return None
    if not hasattr(core, "get_rope_index"):
        return None
    mask = batch.response_mask.bool()  # [B, T]
    B, T = mask.shape
    starts = torch.where(mask.any(-1), mask.float().argmax(-1), batch.attention_mask.sum(-1)).long()  # [B]
    if int(starts.min()) < 2:
        return None
    source, firsts = _distinct_prefixes(batch, starts - 1)
    if len(firsts) == B:
        return None
    ends = batch.attention_mask.sum(-1)  # [B]
    steps = torch.arange(T, device=mask.device)
    if bool((batch.mm_token_type_ids * (steps[None] >= (starts - 1)[:, None])).any()):
        return None  # image tokens after the prefix: the continuation cannot carry them
    positions, _ = core.get_rope_index(
        input_ids=batch.input_ids,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask,
    )  # [3, B, T]
    # 1. the distinct prefixes (prompt minus its last token), right padded, with their images
    rows = torch.tensor(firsts, device=mask.device)  # [U]
    lengths = starts[rows] - 1  # [U]
    P = int(lengths.max())
    prefix_mask = (steps[None, :P] < lengths[:, None]).long()  # [U, P]
    prefix = batch.select(rows)
    out = model(
        input_ids=batch.input_ids[rows, :P] * prefix_mask,
        attention_mask=prefix_mask,
        position_ids=positions[:, rows, :P],
        pixel_values=prefix.pixel_values,
        image_grid_thw=prefix.image_grid_thw,
        mm_token_type_ids=batch.mm_token_type_ids[rows, :P],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    index = torch.tensor(source, device=mask.device)  # [B]  row -> its prefix
    cache.batch_select_indices(index)
    # 2. every row from its last prompt token on: columns starts-1 .. ends-1 of the batch
    C = int((ends - starts + 1).max())
    valid = steps[None, :C] < (ends - starts + 1)[:, None]  # [B, C]
    columns = torch.where(valid, (starts - 1)[:, None] + steps[None, :C], 0)  # [B, C]
    input_ids = batch.input_ids.gather(1, columns) * valid  # [B, C]
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask[index], valid.long()], dim=1),  # [B, P + C]
        position_ids=positions.gather(2, columns[None].expand(3, -1, -1)),  # [3, B, C]
        past_key_values=cache,
        use_cache=True,
    )
    predicted = mask.gather(1, columns[:, 1:]) & valid[:, 1:]  # [B, C - 1]  column c predicts c + 1
    lp, ent = token_logprob_entropy(
        out.logits[:, :-1][predicted],
        input_ids[:, 1:][predicted],
        with_entropy=with_entropy,
        temperature=temperature,
    )  # [N], [N]
    logprobs = torch.zeros((B, T), dtype=lp.dtype, device=mask.device).masked_scatter(mask, lp)
    entropy = torch.zeros_like(logprobs).masked_scatter(mask, ent) if with_entropy else None
    return logprobs, entropy


def _distinct_prefixes(batch: SequenceBatch, lengths: Tensor) -> tuple[list[int], list[int]]:
    """Rows whose first `lengths[b]` tokens and image pixels are equal share a prefix: (for each row the
    index of its prefix, the first row of each prefix)."""
    patches = batch.image_grid_thw.prod(-1)  # [B]
    offsets = (torch.cumsum(patches, 0) - patches).tolist()  # [B]
    seen: dict[tuple, int] = {}
    source, firsts = [], []
    for b, (n, start, size) in enumerate(zip(lengths.tolist(), offsets, patches.tolist(), strict=True)):
        pixels = batch.pixel_values[start : start + size]
        key = (tuple(batch.input_ids[b, :n].tolist()), pixels.shape, pixels.cpu().numpy().tobytes())
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(b)
        source.append(seen[key])
    return source, firsts


@torch.no_grad()
def mean_logprobs(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    texts: Sequence[Any],
    *,
    batch_size: int,
    max_response_tokens: int | None = None,
) -> tuple[list[float], list[int]]:
    """Mean token log-prob of each response (text or token ids) given its prompt and image, and the number
    of tokens scored, in input order: the policy-likelihood score of the trajectory filter and of the
    trainer's in-loop filter. Rows go in batches of similar length (less padding); a batch's rows that
    share a prompt encode it once."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    device = next(model.parameters()).device
    means, counts = [0.0] * len(texts), [0] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seq = collate_sequences(
            processor,
            [prompts[i] for i in rows],
            [images[i] for i in rows],
            [texts[i] for i in rows],
            max_response_tokens,
        ).to(device)
        scored = shared_prefix_logprobs(model, seq) or response_logprobs(model, seq)
        mask = seq.response_mask.to(scored[0].dtype)  # [b, T]
        n = mask.sum(-1)  # [b]
        mean = (scored[0] * mask).sum(-1) / n.clamp(min=1)  # [b]
        for row, m, c in zip(rows, mean.tolist(), n.tolist(), strict=True):
            means[row], counts[row] = m, int(c)
    return means, counts
