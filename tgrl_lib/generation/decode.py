"""A compact sampler for Qwen2-VL-family policies: one prefill per prompt, a preallocated KV cache, G rows.

HF `generate` with `num_return_sequences=G` copies each prompt G times before the prefill, and every
decode step goes through the full model forward (mask construction, rope index, cache objects, logits
processors, stopping criteria). On the tiny CPU recipe that per-step overhead is most of the rollout.
This loop does the same computation with less around it:

1. **Prefill once per prompt.** The batch's distinct prompts (left padded, with their images) go through
   the model's own forward once, with the 3D (M-RoPE) positions of `get_rope_index` passed explicitly.
2. **Share the prompt's cache across the G samples.** The prompt keys/values stay one copy per prompt;
   the generated ones go into a preallocated cache `[B*G, kv_heads, max_new, head_dim]` per layer
   (rows of a group contiguous). Attention of a new token is one matmul of the group's G queries against
   its prompt keys plus one against the row's own generated keys, under a single softmax.
3. **Decode over the model's own modules.** Each step runs the embedding, every layer's norms,
   projections and MLP, the final norm and the LM head of the loaded model. A response token is text,
   so its three M-RoPE components are equal and the rotation is the plain 1D one at `max(prompt
   position) + 1 + t` (what HF's `rope_deltas` give).

Sampling is pure temperature sampling over the full vocabulary (no top-k/top-p, repetition penalty 1, no
n-gram block), as in `hf.py`; `temperature=0` is greedy; suppressed ids (image/video pads) are never
sampled; stop ids end a row (its later tokens are ignored); the model's `generation_config.min_new_tokens`
holds stops back as HF does. The draw is by inverse CDF (one uniform per row) over the probabilities
HF's `multinomial` would use.
The per-token log-probs returned are log softmax(logits / T) of the *unsuppressed* logits (T = 1 when
greedy): the value `models.logprobs.response_logprobs` gives at the same temperature.

`supports(model)` says when the loop applies (Qwen2-VL / Qwen2.5-VL text stacks with full attention and
default / M-RoPE rotary embeddings); otherwise the caller uses HF `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Decoded:
    """What `decode` returns: sampled tokens and their log-probs, rows grouped by prompt."""

    tokens: Tensor  # [B*G, max_new]  after a row's stop token: filler, to be cut by the caller
    logprobs: Tensor  # [B*G, max_new]  fp32, log p(token) at the sampling temperature (1 when greedy)


def _text_stack(model: Any) -> Any | None:
    core = getattr(model, "model", None)
    return getattr(core, "language_model", None)


def supports(model: Any) -> bool:
    """Whether `decode` can run this model (else use HF `generate`)."""
    text = _text_stack(model)
    core = getattr(model, "model", None)
    if text is None or not hasattr(core, "get_rope_index") or not hasattr(model, "lm_head"):
        return False
    config = text.config
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]):
        return False
    rope = getattr(text, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") not in ("default", "mrope"):
        return False
    layer = text.layers[0]
    attn = getattr(layer, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    return all(hasattr(attn, n) for n in names) and hasattr(layer, "mlp")


@torch.no_grad()
def prefill(model: Any, inputs: dict[str, Tensor]) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
    """The prompts' forward: (last-position logits [B, V], per-layer (keys, values) [B, kv, P, d], the
    next text position of each row [B])."""
    core = model.model
    positions, _ = core.get_rope_index(
        input_ids=inputs["input_ids"],
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_grid_thw=inputs.get("image_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )  # [3, B, P]
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    valid = inputs["attention_mask"].bool()[None].expand_as(positions)  # [3, B, P]
    next_position = positions.masked_fill(~valid, -1).amax(dim=(0, 2)) + 1  # [B]
    return out.logits[:, -1].float(), layers, next_position


def _rope(inv_freq: Tensor, position: Tensor, steps: int, scaling: float, dtype: torch.dtype):
    """cos, sin [N, steps, d] of 1D rope at positions `position` [N] + 0 .. steps - 1 (computed in fp32
    like HF, then cast), once per call: step t reads column t."""
    offsets = torch.arange(steps, device=position.device)
    freqs = (position[:, None] + offsets[None]).float()[..., None] * inv_freq.float()  # [N, steps, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, steps, d]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Cache:
    """The prompt's keys/values once per prompt ([B, kv, P, d] per layer, from the prefill) and a
    preallocated cache of the generated ones ([B*G, kv, max_new, d] per layer), with the prompt's padding
    as an additive bias [B, 1, 1, P] (0 or -inf)."""

    def __init__(
        self, prompt_kv: list[tuple[Tensor, Tensor]], attention_mask: Tensor, expand: int, max_new: int
    ):
        self.prompt = prompt_kv
        B, H, P, D = prompt_kv[0][0].shape
        like = prompt_kv[0][0]
        self.new = [
            (like.new_empty(B * expand, H, max_new, D), like.new_empty(B * expand, H, max_new, D))
            for _ in prompt_kv
        ]
        bias = torch.zeros(B, 1, 1, P, dtype=like.dtype, device=like.device)
        self.prompt_bias = bias.masked_fill(~attention_mask.bool()[:, None, None], float("-inf"))
        self.groups = expand


def _attention(q: Tensor, cache: _Cache, i: int, t: int, scale: float) -> Tensor:
    """Attention of one new query per row, q [N, heads, 1, d], over its prompt (shared by the G rows of
    a group: one matmul per prompt) and its own t + 1 generated keys. Returns [N, heads, 1, d]."""
    (kp, vp), (kn, vn) = cache.prompt[i], cache.new[i]
    B, kv, P, d = kp.shape
    N, heads = q.shape[:2]
    G, g = cache.groups, heads // kv
    qg = q.view(B, G, kv, g, d).transpose(1, 2).reshape(B, kv, G * g, d)  # [B, kv, G*g, d]
    s_prompt = (qg @ kp.transpose(-1, -2)) * scale + cache.prompt_bias  # [B, kv, G*g, P]
    s_prompt = s_prompt.view(B, kv, G, g, P).transpose(1, 2).reshape(N, kv, g, P)
    s_new = (q.view(N, kv, g, d) @ kn[:, :, : t + 1].transpose(-1, -2)) * scale  # [N, kv, g, t+1]
    p = torch.softmax(torch.cat([s_prompt, s_new], dim=-1), dim=-1)  # [N, kv, g, P + t + 1]
    p_prompt = p[..., :P].reshape(B, G, kv, g, P).transpose(1, 2).reshape(B, kv, G * g, P)
    out_prompt = (p_prompt @ vp).view(B, kv, G, g, d).transpose(1, 2).reshape(N, kv, g, d)
    out = out_prompt + p[..., P:] @ vn[:, :, : t + 1]  # [N, kv, g, d]
    return out.reshape(N, heads, 1, d)


def _step(text: Any, model: Any, tokens: Tensor, cache: _Cache, t: int, rope: tuple) -> Tensor:
    """Decode step t for tokens [N]: writes generated column t, returns logits [N, V] (fp32)."""
    h = text.embed_tokens(tokens[:, None])  # [N, 1, H]
    N = tokens.shape[0]
    cos, sin = (r[:, t].view(N, 1, 1, -1) for r in rope)  # [N, 1, 1, d]
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        d = attn.head_dim
        q = attn.q_proj(x).view(N, 1, -1, d).transpose(1, 2)  # [N, heads, 1, d]
        k = attn.k_proj(x).view(N, 1, -1, d).transpose(1, 2)  # [N, kv, 1, d]
        v = attn.v_proj(x).view(N, 1, -1, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.new[i]
        keys[:, :, t : t + 1] = k
        values[:, :, t : t + 1] = v
        o = _attention(q, cache, i, t, attn.scaling)  # [N, heads, 1, d]
        h = h + attn.o_proj(o.transpose(1, 2).reshape(N, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(text.norm(h))[:, -1].float()  # [N, V]


def _pick(
    logits: Tensor, temperature: float, allowed: Tensor, cap: int, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(token [N], log p(token) [N]) from fp32 logits [N, V]; only ids where `allowed` [V] (0/1 float)
    is 1 can be drawn, `cap` is the largest allowed id; `bias` [V] (a generation_config's single-token
    `sequence_bias`) shifts the draw, not the returned log-prob."""
    scale = 1.0 if temperature == 0 else temperature
    logp = torch.log_softmax(logits / scale, dim=-1)  # [N, V]  what the training kernel scores
    drawn = logits if bias is None else logits + bias
    if temperature == 0:
        token = drawn.masked_fill(allowed == 0, float("-inf")).argmax(-1)
    else:
        weights = logp.exp() if bias is None else torch.softmax(drawn / temperature, dim=-1)
        token = _inverse_cdf(weights * allowed, cap)  # the suppressed distribution, unnormalised
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _inverse_cdf(weights: Tensor, cap: int) -> Tensor:
    """One draw per row of weights [N, V] >= 0: the first id whose cumulative weight exceeds u ~
    U[0, total). One uniform per row (`torch.multinomial` draws V exponentials per row: slower
    here); ids of weight 0 have an empty cdf step, and `cap` (an allowed id) bounds float rounding."""
    cdf = weights.cumsum(-1)  # [N, V]
    u = torch.rand(weights.shape[0], 1, device=weights.device, dtype=cdf.dtype) * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cap)  # [N]


@torch.no_grad()
def decode(
    model: Any,
    inputs: dict[str, Tensor],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    suppressed: Sequence[int] = (),
    min_new_tokens: int = 0,
    logit_bias: dict[int, float] | None = None,
) -> Decoded:
    """`samples` continuations of each prompt of the left-padded `inputs` (rows of a prompt contiguous).
    Greedy (`temperature=0`) decodes each prompt once and repeats it. `logit_bias` {id: bias} is added
    to the logits of the draw (HF's `sequence_bias` for single tokens)."""
    text = _text_stack(model)
    expand = 1 if temperature == 0 else samples
    logits, prompt_kv, next_position = prefill(model, inputs)  # [B, V], [B]
    logits = logits.repeat_interleave(expand, dim=0)  # [N, V]
    position = next_position.repeat_interleave(expand, dim=0)  # [N]
    N, V = logits.shape
    device = logits.device
    cache = _Cache(prompt_kv, inputs["attention_mask"], expand, max_new_tokens)
    allowed = torch.ones(V, dtype=torch.float32, device=device)
    allowed[[i for i in suppressed if i < V]] = 0
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    allowed_early = allowed.clone()
    allowed_early[stops[stops < V]] = 0  # stops held back until min_new_tokens
    caps = [int(a.nonzero().max()) for a in (allowed, allowed_early)]
    bias = None
    if logit_bias:
        bias = torch.zeros(V, dtype=torch.float32, device=device)
        for i, b in logit_bias.items():
            bias[i] += b
    tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    inv_freq = text.rotary_emb.inv_freq
    scaling = float(getattr(text.rotary_emb, "attention_scaling", 1.0))
    dtype = text.embed_tokens.weight.dtype
    rope = _rope(inv_freq, position, max_new_tokens, scaling, dtype)  # [N, max_new, d] x 2
    for t in range(max_new_tokens):
        early = int(t < min_new_tokens)
        token, lp = _pick(logits, temperature, (allowed, allowed_early)[early], caps[early], bias)
        tokens[:, t], logprobs[:, t] = token, lp
        done |= torch.isin(token, stops)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits = _step(text, model, token, cache, t, rope)
    if expand != samples:
        tokens = tokens.repeat_interleave(samples, dim=0)
        logprobs = logprobs.repeat_interleave(samples, dim=0)
    return Decoded(tokens=tokens, logprobs=logprobs)
