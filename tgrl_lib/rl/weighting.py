"""Token-level reweighting: a weight w_t per response token that multiplies its policy-gradient term.

Scores (raw, >= 0, no gradient):

- ``visual_dependency``: how much the token's log-prob drops when the image is blanked,
  ``max(0, logp_with_image - logp_blank)``. Inspired by VPPO (tokens whose probability changes when image
  patches are blackened) and PGPO (KL between the with-image and text-only predictions); unlike VPPO we
  weight every token instead of keeping the top 20%, and unlike PGPO we score the sampled token's log-prob,
  not the full-distribution KL. The clamp at 0 is our choice: a token that becomes *more* likely without
  the image is not visually grounded, so it scores 0 rather than a negative weight. The caller gets
  ``logprobs_blank`` from one extra no-grad forward on blanked images (`data.images.blank_images`).
- ``entropy``: the policy's entropy at the token's position (high-entropy "forking" tokens, as in
  "Beyond the 80/20 rule" and TW-GRPO; TW-GRPO uses entropy across the group, we use the per-token one).

Normalisation (`normalise_weights`), over the tokens the weights apply to (``apply_to``), one of:

- ``mean`` (default): ``w = raw / mean(raw)`` (mean 1), then ``w = (1 - alpha) + alpha * w`` (still
  mean 1), then ``w = clip(w, w_min, w_max)``. There is NO renormalisation after clipping: every weight
  lies in [w_min, w_max], and the mean after clipping may differ from 1 (`weight_stats` reports it).
  Heavy-tailed scores make this degenerate: measured on the tiny reproduction recipe, visual-dependency
  scores are near 0 for most tokens, so ~93% of them sat at w_min and the mean weight was 0.65.
- ``rank``: each token's score is replaced by its quantile ``q = (rank + 0.5) / n`` among the selected
  tokens (tied scores share their average rank), and ``w = 1 + alpha * h * (2q - 1)`` with
  ``h = min(1 - w_min, w_max - 1)``. The mean is exactly 1, no weight is clipped, and only the order of
  the scores matters, so one outlier cannot flatten the rest. With the default bounds the weights span
  (0.5, 1.5); tokens that all score 0 share one weight below 1.

- ``top_k`` (VPPO, arXiv 2510.09285): the ``top_k`` share of the selected tokens with the highest scores
  get weight 1, the others 0 (blended ``w = (1 - alpha) + alpha * mask``), so only the most visually
  dependent tokens carry gradient. Ties are broken by position (stable sort), so the mask is deterministic.
  VPPO applies it to on-policy tokens (``apply_to: policy``); here it may also apply to expert tokens. VPPO's
  trajectory-level advantage scaling is not implemented. The loss still divides by all valid tokens.
  Off by default (``mean`` stays the default) until the reproduction table decides.

The counterfactual image of visual dependency is black by default (VPPO blackens patches); the synthetic
scenes have a white background, so a black image is out of distribution for them: `blank_fill`
(`WeightingConfig.blank_fill`) chooses each image's background colour or a fixed RGB fill instead
(`data.images.blank_images`).

Pass the whole rollout batch, not a micro-batch, so a token's weight does not depend on how the batch is
split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tgrl_lib.errors import TgrlError


def visual_dependency(logprobs_with_image: Tensor, logprobs_blank: Tensor, mask: Tensor) -> Tensor:
    """Raw visual-dependency score per token, ``max(0, logp_img - logp_blank)``, 0 outside `mask`. [B, T]"""
    _check_same("logprobs_blank", logprobs_blank, logprobs_with_image)
    _check_same("mask", mask, logprobs_with_image)
    drop = (logprobs_with_image.detach().float() - logprobs_blank.detach().float()).clamp(min=0.0)  # [B, T]
    return torch.where(mask.bool(), drop, 0.0)


def entropy_scores(entropy: Tensor, mask: Tensor) -> Tensor:
    """Raw entropy score per token (the policy entropy at that position, >= 0), 0 outside `mask`. [B, T]"""
    _check_same("mask", mask, entropy)
    return torch.where(mask.bool(), entropy.detach().float().clamp(min=0.0), 0.0)


def selected_tokens(mask: Tensor, apply_to: str, expert_mask: Tensor | None) -> Tensor:
    """Valid tokens the weights apply to (expert rows, on-policy rows or both); pass it to weight_stats."""
    if apply_to not in ("expert", "policy", "both"):
        raise TgrlError(f"weighting: unknown apply_to {apply_to!r}", hint="use expert, policy or both")
    no_experts = mask.new_zeros(mask.shape[0], dtype=torch.bool)
    rows = no_experts if expert_mask is None else expert_mask.bool()  # [B]  True = expert trajectory
    if tuple(rows.shape) != tuple(mask.shape[:1]):
        raise TgrlError(f"weighting: expert_mask has shape {tuple(rows.shape)}, expected ({mask.shape[0]},)")
    chosen = {"expert": rows, "policy": ~rows, "both": torch.ones_like(rows)}[apply_to]  # [B]
    return mask.bool() & chosen[:, None]  # [B, T]


def normalise_weights(
    raw: Tensor,
    mask: Tensor,
    *,
    w_min: float = 0.5,
    w_max: float = 2.0,
    alpha: float = 1.0,
    apply_to: str = "both",
    expert_mask: Tensor | None = None,
    method: str = "mean",
    top_k: float = 0.2,
) -> Tensor:
    """Turn raw scores [B, T] into weights [B, T] over the selected tokens (see the module docstring for
    the `method`s "mean" and "rank", mean 1, and "top_k", a 0/1 mask of the `top_k` share).

    Selected tokens are the valid (`mask`) tokens of the rows `apply_to` names ("expert", "policy" or
    "both"; `expert_mask` [B] marks expert rows). Every other position gets 1. If no token is selected or
    all selected scores are 0, all weights are 1.
    """
    if not 0.0 <= w_min <= w_max or not 0.0 <= alpha <= 1.0:
        raise TgrlError(
            f"weighting: need 0 <= w_min <= w_max and 0 <= alpha <= 1, got {w_min}, {w_max}, {alpha}"
        )
    if method not in (*NORMALISERS, "top_k"):
        raise TgrlError(
            f"weighting: unknown normalisation {method!r}", hint=f"use one of {[*NORMALISERS, 'top_k']}"
        )
    if method == "rank" and not w_min <= 1.0 <= w_max:
        raise TgrlError(f"weighting: rank normalisation needs w_min <= 1 <= w_max, got {w_min}, {w_max}")
    _check_same("mask", mask, raw)
    selected = selected_tokens(mask, apply_to, expert_mask)  # [B, T]
    scores = torch.where(selected, raw.detach().float(), 0.0)  # [B, T]
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise TgrlError(
            "weighting: raw token scores must be finite and >= 0", hint="check the scorer's inputs"
        )
    ones = torch.ones_like(scores)
    n = int(selected.sum())
    if n == 0 or float(scores.sum()) == 0.0:
        return ones
    if method == "top_k":
        weights = top_k_mask(scores[selected], top_k, alpha)  # [n]
    else:
        weights = NORMALISERS[method](scores[selected], w_min, w_max, alpha)  # [n]
    out = ones.clone()
    out[selected] = weights
    return out


def _mean_weights(scores: Tensor, w_min: float, w_max: float, alpha: float) -> Tensor:
    """Scores [n] -> scores / mean, blended towards 1 by alpha, clipped to [w_min, w_max]. [n]"""
    normalised = scores / scores.mean()  # [n]  mean 1
    return ((1.0 - alpha) + alpha * normalised).clamp(w_min, w_max)  # alpha=0 uniform, alpha=1 full


def _rank_weights(scores: Tensor, w_min: float, w_max: float, alpha: float) -> Tensor:
    """Scores [n] -> weights from their quantiles, symmetric around 1 (mean exactly 1), never clipped. [n]"""
    n = scores.numel()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # [u]  rank of the first token holding each distinct value
    mid_rank = first.float() + (counts.float() - 1.0) / 2.0  # [u]  ties share their average rank
    quantile = (mid_rank[inverse] + 0.5) / n  # [n]  in (0, 1), mean 0.5
    half_span = min(1.0 - w_min, w_max - 1.0)
    return 1.0 + alpha * half_span * (2.0 * quantile - 1.0)


def top_k_mask(scores: Tensor, fraction: float, alpha: float = 1.0) -> Tensor:
    """VPPO's token mask: 1 on the ceil(fraction * n) highest scores [n], 0 elsewhere, blended by alpha.

    >>> top_k_mask(torch.tensor([0.1, 0.9, 0.0, 0.5, 0.5]), 0.4).tolist()
    [0.0, 1.0, 0.0, 1.0, 0.0]
    """
    if not 0.0 < fraction <= 1.0:
        raise TgrlError(f"weighting: top_k must be in (0, 1], got {fraction}")
    k = math.ceil(fraction * scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices  # [n]  ties: earlier position first
    mask = torch.zeros_like(scores)
    mask[order[:k]] = 1.0
    return (1.0 - alpha) + alpha * mask


# method -> (selected scores [n], w_min, w_max, alpha) -> weights [n]
NORMALISERS: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    "mean": _mean_weights,
    "rank": _rank_weights,
}


def _score_visual_dependency(
    *,
    response_mask: Tensor,
    logprobs_with_image: Tensor | None = None,
    logprobs_blank: Tensor | None = None,
    **_,
) -> Tensor:
    if logprobs_with_image is None or logprobs_blank is None:
        raise TgrlError(
            "weighting: kind 'visual_dependency' needs logprobs_with_image and logprobs_blank",
            hint="run one no-grad forward on blanked images, or set weighting.kind to none",
        )
    return visual_dependency(logprobs_with_image, logprobs_blank, response_mask)


def _score_entropy(*, response_mask: Tensor, entropy: Tensor | None = None, **_) -> Tensor:
    if entropy is None:
        raise TgrlError("weighting: kind 'entropy' needs the per-token entropy", hint="pass entropy=[B, T]")
    return entropy_scores(entropy, response_mask)


# kind -> scorer returning raw scores [B, T], or None for uniform weights
SCORERS: dict[str, Callable[..., Tensor | None]] = {
    "none": lambda **_: None,
    "visual_dependency": _score_visual_dependency,
    "entropy": _score_entropy,
}


def compute_token_weights(
    kind: str,
    *,
    response_mask: Tensor,
    expert_mask: Tensor | None = None,
    logprobs_with_image: Tensor | None = None,
    logprobs_blank: Tensor | None = None,
    entropy: Tensor | None = None,
    w_min: float = 0.5,
    w_max: float = 2.0,
    alpha: float = 1.0,
    apply_to: str = "both",
    method: str = "mean",
    top_k: float = 0.2,
) -> Tensor:
    """Token weights [B, T] of the given kind ("none", "visual_dependency", "entropy"), normalised.

    Only the inputs the kind needs are required: visual_dependency needs `logprobs_with_image` and
    `logprobs_blank`, entropy needs `entropy`; "none" returns ones.
    """
    if kind not in SCORERS:
        raise TgrlError(f"weighting: unknown kind {kind!r}", hint=f"use one of {list(SCORERS)}")
    raw = SCORERS[kind](
        response_mask=response_mask,
        logprobs_with_image=logprobs_with_image,
        logprobs_blank=logprobs_blank,
        entropy=entropy,
    )
    if raw is None:
        return torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    return normalise_weights(
        raw,
        response_mask,
        w_min=w_min,
        w_max=w_max,
        alpha=alpha,
        apply_to=apply_to,
        expert_mask=expert_mask,
        method=method,
        top_k=top_k,
    )


def weight_stats(
    weights: Tensor, mask: Tensor, *, w_min: float = 0.5, w_max: float = 2.0
) -> dict[str, float]:
    """Summary of the weights over `mask` (pass the tokens they apply to): mean, std, min, max, clip_frac.

    ``weights/clip_frac`` is the share of those tokens sitting at w_min or w_max (i.e. clipped). All
    values are 0.0 for an empty mask.
    """
    _check_same("mask", mask, weights)
    w = weights.detach().float()[mask.bool()]  # [n]
    if w.numel() == 0:
        return {f"weights/{name}": 0.0 for name in ("mean", "std", "min", "max", "clip_frac")}
    at_bound = ((w - w_min).abs() <= 1e-6) | ((w - w_max).abs() <= 1e-6)  # [n]  clipped tokens
    return {
        "weights/mean": float(w.mean()),
        "weights/std": float(w.std(correction=0)),
        "weights/min": float(w.min()),
        "weights/max": float(w.max()),
        "weights/clip_frac": float(at_bound.float().mean()),
    }


def _check_same(name: str, tensor: Tensor, like: Tensor) -> None:
    if tuple(tensor.shape) != tuple(like.shape):
        raise TgrlError(f"weighting: {name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
