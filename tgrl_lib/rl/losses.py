"""Per-token TGRL objective: PPO-clipped on-policy tokens, LUFFY-shaped expert tokens, token weights.

For every valid response token t of sequence b (advantage A_b, token weight w_t):

- on-policy rows (PPO, arXiv 1707.06347; asymmetric clip from DAPO, arXiv 2503.14476):
  ``ratio = exp(logp - old_logp)``; ``pg_loss = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))``.
  ``clip=False`` keeps ``-A*ratio`` only (LUFFY's recipe removes the clip).
- expert rows (LUFFY, arXiv 2504.14945): the expert's own probability is unknown, so the ratio is the
  policy probability ``p = exp(logp)`` (expert prob taken as 1), shaped ``p / (p + gamma)``, never clipped:
  ``expert_loss = -A * p/(p+gamma)``, whose gradient is ``-A * gamma*p/(p+gamma)^2 * dlogp``.
  ``expert_shaping="plain"`` uses ``p`` itself (plain importance sampling).
- both terms are multiplied by ``w_t`` (see `tgrl_lib.rl.weighting`); LUFFY has no token weights.
- optional k3 KL to a frozen reference (Schulman's estimator, as GRPO): ``exp(ref-logp) - (ref-logp) - 1``,
  times ``kl_coef``, and an entropy bonus ``- entropy_coef * entropy``.

- optional expert SFT term (CHORD, arXiv 2508.11408): with ``sft_coef = mu`` the loss becomes
  ``(1 - mu) * (policy + expert terms) + mu * L_SFT``, ``L_SFT`` the (token-weighted) negative log-likelihood
  of the injected expert tokens averaged over them; ``sft_token_weight="p(1-p)"`` multiplies each expert
  token's NLL by CHORD's ``phi = sg(p (1 - p))`` (down-weights tokens the policy already knows or finds
  alien). `chord_coef` decays mu over training (CHORD decays it; linear or cosine here). Our changes:
  the experts also stay in the mixed group (shaped term and advantages, scaled by ``1 - mu``), where
  CHORD's RL part is on-policy only; KL and entropy regularisers are not scaled by ``1 - mu``. Off
  (``None``) by default until the reproduction table decides.

Our choices, not in the papers: the token weights scale only the surrogate terms, not the KL or entropy
regularisers; the k3 KL is applied to on-policy tokens only (k3 estimates KL(pi || ref) only for tokens
sampled from pi, which expert tokens are not); the entropy bonus applies to every valid token.

Aggregation (`aggregate`, one branch per rule): ``token_mean`` (DAPO: sum over valid tokens / number
of valid tokens), ``seq_mean`` (GRPO: mean over each sequence's tokens, then over sequences), ``constant``
(Dr.GRPO, arXiv 2503.20783: sum / (num_sequences * max_response_len)). A "sequence" is a row with at least
one valid token. All three are linear in the per-token terms, so `loss/policy + loss/expert + loss/kl -
loss/entropy_bonus == loss/total` exactly.

Gradient accumulation: pass ``num_valid_tokens_total`` and ``num_sequences_total`` of the whole optimizer
step (`accumulation_totals` on the step's response mask, or the sum of it over micro-batches) to every
micro-batch call; the micro-batch losses then *sum* to the full-batch loss (do not divide by the number of
micro-batches). Under data parallelism (gradients averaged over ranks) pass global totals divided by the
world size. Left as None, the totals are those of the tensors passed in.

Stats come back as detached tensors with their combining rule (`tgrl_lib.rl.stats`): loss contributions and
token counts are `StepSum`s, every mean is a `TokenMean`; nothing is turned into a Python number here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.stats import Stat, loss_term, step_sum, token_mean

AGGREGATIONS = ("token_mean", "seq_mean", "constant")
EXPERT_SHAPINGS = ("shaped", "plain")
SFT_TOKEN_WEIGHTS = ("none", "p(1-p)")


def accumulation_totals(response_mask: Tensor, expert_mask: Tensor | None = None) -> dict[str, int]:
    """Normaliser counts of a whole optimizer step, to pass to every micro-batch's loss call (with
    `expert_mask` [B] also the expert tokens, the normaliser of the CHORD SFT term)."""
    mask = response_mask.bool()
    totals = {"num_valid_tokens_total": int(mask.sum()), "num_sequences_total": int(mask.any(dim=1).sum())}
    if expert_mask is not None:
        totals["num_expert_tokens_total"] = int((mask & expert_mask.bool()[:, None]).sum())
    return totals


def chord_coef(step: int, total_steps: int, mu: float, mu_end: float | None, decay: str = "cosine") -> float:
    """CHORD's mu at `step` (1-based) of `total_steps`: `mu` throughout when `mu_end` is None, else going
    from `mu` (step 1) to `mu_end` (the last step) linearly or along a half cosine.

    >>> chord_coef(1, 5, 0.9, 0.1), chord_coef(3, 5, 0.9, 0.1, "linear"), chord_coef(5, 5, 0.9, 0.1)
    (0.9, 0.5, 0.1)
    """
    if mu_end is None or total_steps <= 1:
        return mu
    frac = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
    if decay == "linear":
        return mu + (mu_end - mu) * frac
    if decay == "cosine":
        return mu_end + (mu - mu_end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise TgrlError(f"losses: unknown mu decay {decay!r}", hint="use linear or cosine")


def expert_nll(logprobs: Tensor, token_weight: str = "none") -> tuple[Tensor, Tensor]:
    """CHORD's per-token SFT term on expert tokens: ``(phi * -logp [B, T], phi [B, T])`` with
    ``phi = sg(p (1 - p))`` for "p(1-p)", else 1."""
    _choice("sft_token_weight", token_weight, SFT_TOKEN_WEIGHTS)
    p = torch.exp(logprobs.detach())  # [B, T]
    phi = p * (1.0 - p) if token_weight == "p(1-p)" else torch.ones_like(p)  # [B, T]  no gradient
    return -logprobs * phi, phi


def aggregate(
    term: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_valid_tokens_total: int,
    num_sequences_total: int,
    max_response_len: int | None = None,
) -> Tensor:
    """Per-token `term` [B, T] over valid tokens `mask` [B, T] -> the scalar loss contribution."""
    term = torch.where(mask, term, 0.0)  # [B, T]
    if mode == "token_mean":  # DAPO: every valid token counts once
        return term.sum() / max(num_valid_tokens_total, 1)
    if mode == "seq_mean":  # GRPO: each sequence's token mean, then the mean over sequences
        lengths = mask.sum(dim=1).clamp(min=1)  # [B]  |o_b|
        return (term.sum(dim=1) / lengths).sum() / max(num_sequences_total, 1)
    if mode == "constant":  # Dr.GRPO: sum / (sequences * the response budget)
        return term.sum() / (max(num_sequences_total, 1) * max_response_len)
    raise TgrlError(f"losses: unknown aggregation {mode!r}", hint=f"use one of {list(AGGREGATIONS)}")


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO loss per token. Returns ``(pg_loss [B, T], ratio [B, T], clipped [B, T] bool)``.

    `advantages` is ``[B]`` (one per sequence, broadcast over tokens). `clipped` marks tokens where the
    clipped branch wins, i.e. whose gradient the clip removes (ratio above 1+clip_high with A > 0, or below
    1-clip_low with A < 0).
    """
    adv = advantages[:, None]  # [B, 1]
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]  pi / pi_old
    pg_loss1 = -adv * ratio  # [B, T]
    if not clip:
        return pg_loss1, ratio, torch.zeros_like(ratio, dtype=torch.bool)
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    return torch.maximum(pg_loss1, pg_loss2), ratio, pg_loss2 > pg_loss1


def expert_surrogate(
    logprobs: Tensor, advantages: Tensor, *, shaping: str = "shaped", gamma: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-token loss ``-A * f(p)``, no clip. Returns ``(loss [B, T], p [B, T], f(p) [B, T])``."""
    _choice("expert_shaping", shaping, EXPERT_SHAPINGS)
    p = torch.exp(logprobs)  # [B, T]  policy prob of the expert's token
    # LUFFY's f(p) = p / (p + gamma), or plain importance sampling with the expert's probability taken as 1
    shaped = p / (p + gamma) if shaping == "shaped" else p  # [B, T]
    return -advantages[:, None] * shaped, p, shaped


def shaping_grad_weight(shaped: Tensor, p: Tensor, shaping: str) -> Tensor:
    """d f(p) / d logp, the weight on an expert token's score function (a statistic): for the shaped
    ratio f(1 - f) = gamma*p / (p+gamma)^2, for the plain one p."""
    return shaped * (1.0 - shaped) if shaping == "shaped" else p


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    log_ratio = ref_logprobs - logprobs  # [B, T]
    return torch.exp(log_ratio) - log_ratio - 1.0


def _check_shapes(logprobs: Tensor, per_token: dict, per_sequence: dict) -> None:
    """Raise a TgrlError naming the first input not shaped [B, T] (per_token) or [B] (per_sequence)."""
    if logprobs.dim() != 2:
        raise TgrlError(f"losses: logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    expected = [(n, t, tuple(logprobs.shape)) for n, t in per_token.items()]
    expected += [(n, t, tuple(logprobs.shape[:1])) for n, t in per_sequence.items()]
    for name, tensor, shape in expected:
        if tensor is not None and tuple(tensor.shape) != shape:
            raise TgrlError(
                f"losses: {name} has shape {tuple(tensor.shape)}, expected {shape}",
                hint="per-token inputs are [B, T] like logprobs; advantages and expert_mask are [B]",
            )


def _choice(what: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise TgrlError(f"losses: unknown {what} {value!r}", hint=f"use one of {list(options)}")


class TGRLLoss(nn.Module):
    """Mixed-group TGRL policy loss; with no expert rows and unit weights it is GRPO/DAPO.

    Construct with the switches of DESIGN.md §4; call with per-token tensors; returns ``(loss, stats)``,
    stats being detached tensors with their rule (`tgrl_lib.rl.stats`): StepSums loss/{total,policy,expert,
    kl,entropy_bonus} (contributions to the loss) and tokens/{policy,expert}; TokenMeans policy/{ratio_mean,
    clipfrac,clipfrac_low,clipfrac_high}, expert/{shaped_weight_mean,grad_weight_mean,prob_mean}; kl/mean if
    ref_logprobs given; {policy,expert}/entropy if entropy given.
    """

    def __init__(
        self,
        *,
        aggregation: str = "token_mean",
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        clip: bool = True,
        expert_shaping: str = "shaped",
        shaping_gamma: float = 0.1,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        max_response_len: int | None = None,
        sft_coef: float | None = None,
        sft_token_weight: str = "none",
    ):
        super().__init__()
        _choice("sft_token_weight", sft_token_weight, SFT_TOKEN_WEIGHTS)
        if sft_coef is not None and not 0.0 <= sft_coef <= 1.0:
            raise TgrlError(f"losses: sft_coef (CHORD mu) must be in [0, 1], got {sft_coef}")
        self.sft_coef, self.sft_token_weight = sft_coef, sft_token_weight
        _choice("aggregation", aggregation, AGGREGATIONS)
        _choice("expert_shaping", expert_shaping, EXPERT_SHAPINGS)
        if aggregation == "constant" and (max_response_len is None or max_response_len < 1):
            raise TgrlError(
                "losses: aggregation 'constant' (Dr.GRPO) needs max_response_len >= 1",
                hint="pass the rollout budget, e.g. max_response_len=max_new_tokens",
            )
        if min(clip_low, clip_high, kl_coef, entropy_coef) < 0 or shaping_gamma <= 0:
            raise TgrlError("losses: clips and coefficients must be >= 0 and shaping_gamma > 0")
        self.aggregation, self.clip_low, self.clip_high, self.clip = aggregation, clip_low, clip_high, clip
        self.expert_shaping, self.shaping_gamma = expert_shaping, shaping_gamma
        self.kl_coef, self.entropy_coef, self.max_response_len = kl_coef, entropy_coef, max_response_len

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        *,
        expert_mask: Tensor | None = None,
        token_weights: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
        num_valid_tokens_total: int | None = None,
        num_sequences_total: int | None = None,
        num_expert_tokens_total: int | None = None,
        sft_coef: float | None = None,
    ) -> tuple[Tensor, dict[str, Stat]]:
        """Loss for one (micro-)batch of B sequences with T response positions.

        logprobs [B, T] (current policy, with grad), old_logprobs [B, T] (behaviour policy; ignored on
        expert rows, may hold anything there), advantages [B], response_mask [B, T], expert_mask [B] bool,
        token_weights [B, T] (already normalised; default ones), ref_logprobs [B, T] (needed if kl_coef > 0;
        reported as kl/mean whenever given), entropy [B, T] (with grad; needed if entropy_coef > 0).
        `sft_coef` overrides the CHORD mu for this call; `num_expert_tokens_total` normalises its SFT term.
        """
        like_logprobs = {"old_logprobs": old_logprobs, "response_mask": response_mask, "entropy": entropy}
        like_logprobs.update(token_weights=token_weights, ref_logprobs=ref_logprobs)
        _check_shapes(logprobs, like_logprobs, {"advantages": advantages, "expert_mask": expert_mask})
        self._check_needs(ref_logprobs, entropy)
        mask = response_mask.bool()  # [B, T]
        no_experts = torch.zeros_like(advantages, dtype=torch.bool)
        expert_rows = no_experts if expert_mask is None else expert_mask.bool()  # [B]
        expert_tok = mask & expert_rows[:, None]  # [B, T]
        policy_tok = mask & ~expert_rows[:, None]  # [B, T]
        logp = torch.where(mask, logprobs.float(), 0.0)  # [B, T]  padding may hold -inf: keep grads finite
        adv = advantages.detach().float()  # [B]
        w = torch.ones_like(logp) if token_weights is None else token_weights.detach().float()  # [B, T]
        # expert rows and padding get old = ref = logp (ratio 1): what old/ref hold there cannot leak NaN
        old = torch.where(policy_tok, old_logprobs.detach().float(), logp.detach())  # [B, T]
        totals = {
            "num_valid_tokens_total": num_valid_tokens_total,
            "num_sequences_total": num_sequences_total,
        }
        if None in totals.values():  # counting here syncs with the device: the update passes both
            totals = accumulation_totals(mask) | {k: v for k, v in totals.items() if v is not None}

        def over(term: Tensor, where: Tensor) -> Tensor:  # [B, T] -> scalar, zero outside `where`
            term = torch.where(where, term, 0.0)
            return aggregate(term, mask, self.aggregation, max_response_len=self.max_response_len, **totals)

        pg_loss, ratio, clipped = clipped_surrogate(
            logp, old, adv, clip_low=self.clip_low, clip_high=self.clip_high, clip=self.clip
        )
        expert_loss, p, shaped = expert_surrogate(
            logp, adv, shaping=self.expert_shaping, gamma=self.shaping_gamma
        )
        terms = {"policy": over(w * pg_loss, policy_tok)}  # each term: its contribution to the loss
        terms["expert"] = over(w * expert_loss, expert_tok)
        terms["kl"] = terms["entropy_bonus"] = torch.zeros_like(terms["policy"])
        stats: dict[str, Stat] = {}
        if ref_logprobs is not None:
            kl = k3_kl(logp, torch.where(policy_tok, ref_logprobs.detach().float(), logp.detach()))  # [B, T]
            stats["kl/mean"] = token_mean(kl, policy_tok)
            if self.kl_coef > 0:
                terms["kl"] = self.kl_coef * over(kl, policy_tok)
        if entropy is not None:
            entropy = torch.where(mask, entropy.float(), 0.0)  # [B, T]
            stats["policy/entropy"] = token_mean(entropy, policy_tok)
            stats["expert/entropy"] = token_mean(entropy, expert_tok)
            if self.entropy_coef > 0:
                terms["entropy_bonus"] = self.entropy_coef * over(entropy, mask)
        mu = self.sft_coef if sft_coef is None else sft_coef
        if mu is not None:  # CHORD: (1 - mu) * RL surrogate + mu * SFT on the expert tokens
            terms["policy"], terms["expert"] = (1.0 - mu) * terms["policy"], (1.0 - mu) * terms["expert"]
            terms["sft"], chord_stats = self._sft_term(logp, w, expert_tok, mu, num_expert_tokens_total)
            stats.update(chord_stats)
        loss = terms["policy"] + terms["expert"] + terms["kl"] - terms["entropy_bonus"] + terms.get("sft", 0)
        stats["loss/total"] = loss_term(loss)
        stats.update({f"loss/{name}": loss_term(term) for name, term in terms.items()})
        stats.update(self._token_stats(ratio, clipped, p, shaped, policy_tok, expert_tok))
        return loss, stats

    def _check_needs(self, ref_logprobs: Tensor | None, entropy: Tensor | None) -> None:
        if self.kl_coef > 0 and ref_logprobs is None:
            raise TgrlError("losses: kl_coef > 0 needs ref_logprobs", hint="pass them or set kl_coef=0")
        if self.entropy_coef > 0 and entropy is None:
            raise TgrlError("losses: entropy_coef > 0 needs entropy", hint="pass it or set entropy_coef=0")

    def _sft_term(
        self, logp: Tensor, w: Tensor, expert_tok: Tensor, mu: float, n_expert: int | None
    ) -> tuple[Tensor, dict[str, Stat]]:
        """``mu * L_SFT``: the weighted expert-token NLL averaged over the step's expert tokens."""
        nll, phi = expert_nll(logp, self.sft_token_weight)  # [B, T]
        n_expert = n_expert if n_expert is not None else int(expert_tok.sum())
        sft = torch.where(expert_tok, w * nll, 0.0).sum() / max(n_expert, 1)
        stats = {"expert/sft_phi_mean": token_mean(phi, expert_tok)}
        stats["expert/sft_coef"] = token_mean(torch.full_like(phi, mu), expert_tok)
        return mu * sft, stats

    def _token_stats(self, ratio, clipped, p, shaped, policy_tok, expert_tok) -> dict[str, Stat]:
        grad_weight = shaping_grad_weight(shaped, p, self.expert_shaping)  # [B, T]  d f(p) / d logp
        return {
            "policy/ratio_mean": token_mean(ratio, policy_tok),
            "policy/clipfrac": token_mean(clipped.float(), policy_tok),
            "policy/clipfrac_low": token_mean((clipped & (ratio < 1)).float(), policy_tok),
            "policy/clipfrac_high": token_mean((clipped & (ratio > 1)).float(), policy_tok),
            "expert/shaped_weight_mean": token_mean(shaped, expert_tok),
            "expert/grad_weight_mean": token_mean(grad_weight, expert_tok),
            "expert/prob_mean": token_mean(p, expert_tok),
            "tokens/policy": step_sum(policy_tok.sum()),
            "tokens/expert": step_sum(expert_tok.sum()),
        }


def sft_loss(
    logprobs: Tensor,
    response_mask: Tensor,
    token_weights: Tensor | None = None,
    *,
    num_valid_tokens_total: int | None = None,
) -> tuple[Tensor, dict[str, Stat]]:
    """Supervised fine-tuning on expert trajectories: weighted negative log-likelihood, token mean.

    ``loss = sum_t w_t * (-logp_t) / num_valid_tokens_total`` (default: the valid tokens passed in), so
    micro-batches sum to the full-batch loss exactly as for `TGRLLoss`.
    """
    _check_shapes(logprobs, {"response_mask": response_mask, "token_weights": token_weights}, {})
    mask = response_mask.bool()  # [B, T]
    nll = -torch.where(mask, logprobs.float(), 0.0)  # [B, T]
    w = torch.ones_like(nll) if token_weights is None else token_weights.detach().float()  # [B, T]
    total = num_valid_tokens_total if num_valid_tokens_total is not None else int(mask.sum())
    loss = aggregate(w * nll, mask, "token_mean", num_valid_tokens_total=total, num_sequences_total=0)
    stats = {
        "loss/sft": loss_term(loss),
        "sft/nll_mean": token_mean(nll, mask),
        "tokens/sft": step_sum(mask.sum()),
    }
    return loss, stats
