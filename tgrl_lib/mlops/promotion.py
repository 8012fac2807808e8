"""The promotion gate: move alias `champion` to a registered version only when it beats the champion.

The rule: the candidate's mean primary metric (over the benchmarks it shares with the reference) must beat
the reference's by more than `margin`, and no shared benchmark may drop by more than `max_regression`;
higher is better. The reference is the champion; with no champion yet, the start model the candidate was
trained from (its `baseline` metrics, from the same evaluation), so a first version that learned nothing is
not promoted. An optional absolute `floor` on the candidate's mean comes on top. Only with neither a
champion nor a baseline is the first evaluated version promoted as it is. Promoting the current champion
again changes nothing ("already champion"); a version without `eval.*.<primary>` tags, or whose artifacts
fail `registry.verify_version` (not listable, files missing, checksums wrong), is refused. The decision, both
numbers and the evidence are version tags (`promotion.decision|reason|compared_to|candidate_mean|
reference_mean|evidence|time`).

Compare-and-set (our construction: MLflow has no transactions). Reading the champion, judging and moving
the alias happen while this process holds a registry-side lock: a registered model named
`<model>.promotion-lock`, created with its owner and expiry as tags. Creating a registered model is the one
atomic test-and-set every MLflow backend offers (the name is the store's primary key, so of two concurrent
creates exactly one succeeds); waiters poll until it is deleted. A lock past its expiry (its holder
crashed) is broken by renaming it to a unique name, so of two breakers one wins. Before moving the alias
the holder re-reads the lock (still its own, not about to expire) and after moving it re-reads the alias;
either check failing is an error, never a silent promotion.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.registry import CHAMPION, eval_tags, metrics_from_tags, registry_client, verify_version
from tgrl_lib.mlops.tracking import metric_key, mlflow_errors

LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_S = 120.0
LOCK_WAIT_S = 120.0
_OWNER, _EXPIRES = "tgrl.lock.owner", "tgrl.lock.expires"


# ------------------------------------------------------------------------------------ the lock
class PromotionLock:
    """Context manager: hold `<model>.promotion-lock` in the registry (see the module docstring)."""

    def __init__(
        self, client: Any, model_name: str, *, ttl_s: float = LOCK_TTL_S, wait_s: float = LOCK_WAIT_S
    ):
        self.client, self.model_name = client, model_name
        self.name = model_name + LOCK_SUFFIX
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.expires = 0.0

    def __enter__(self) -> PromotionLock:
        deadline = time.monotonic() + self.wait_s
        while not self._try_create():
            held = self._read(self.name)
            if held is not None and held[0] == self.owner:  # our create went through; its answer was lost
                self.expires = held[1]
                return self
            if held is not None and held[1] < time.time():
                self._break(held[0])
                continue
            if time.monotonic() > deadline:
                owner, left = held[0] if held else "?", (held[1] if held else time.time()) - time.time()
                raise TgrlError(
                    f"promotion of {self.model_name!r} is locked by {owner} for {left:.0f}s more",
                    hint=f"another promote is running; retry later, or delete registered model {self.name!r} "
                    "if its holder is known to be dead",
                )
            time.sleep(random.uniform(0.05, 0.3))
        return self

    def __exit__(self, *exc: Any) -> None:
        held = self._read(self.name)
        if held is not None and held[0] == self.owner:
            self._delete(self.name)

    def check_held(self, guard_s: float = 5.0) -> None:
        """Raise unless the lock is still ours with more than `guard_s` seconds left."""
        held = self._read(self.name)
        if held is None or held[0] != self.owner or held[1] - time.time() < guard_s:
            raise TgrlError(
                f"lost the promotion lock of {self.model_name!r} (expired or broken): nothing was changed",
                hint="run promote again",
            )

    def _try_create(self) -> bool:
        from mlflow.exceptions import MlflowException

        self.expires = time.time() + self.ttl_s
        tags = {_OWNER: self.owner, _EXPIRES: f"{self.expires:.3f}"}
        try:
            self.client.create_registered_model(
                self.name, tags=tags, description=f"tgrl promotion lock of {self.model_name!r}"
            )
            return True
        except MlflowException as err:
            if err.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise TgrlError(f"MLflow: taking the promotion lock {self.name!r} failed: {err}") from err

    def _read(self, name: str) -> tuple[str, float] | None:
        """(owner, expiry) of lock model `name`, None when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(name).tags
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise TgrlError(f"MLflow: reading the promotion lock {name!r} failed: {err}") from err
        try:
            return tags.get(_OWNER, "?"), float(tags.get(_EXPIRES, "0"))
        except ValueError:
            return tags.get(_OWNER, "?"), 0.0  # an unreadable expiry counts as expired

    def _break(self, stale_owner: str) -> None:
        """Remove an expired lock: rename it away (only one breaker can), delete it if it was the stale
        one; if the lock renamed was a fresh one (taken between our read and the rename), put it back."""
        from mlflow.exceptions import MlflowException

        aside = f"{self.name}.stale-{uuid.uuid4().hex[:12]}"
        try:
            self.client.rename_registered_model(self.name, aside)
        except MlflowException:
            return  # someone else broke or released it first
        held = self._read(aside)
        if held is not None and held[0] != stale_owner and held[1] > time.time():
            try:
                self.client.rename_registered_model(aside, self.name)
                return
            except MlflowException:
                pass
        self._delete(aside)

    def _delete(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise TgrlError(f"MLflow: releasing the promotion lock {name!r} failed: {err}") from err


# ------------------------------------------------------------------------------------ the verdict
@dataclass
class PromotionDecision:
    """The gate's verdict: `promoted` means `version` holds `@champion` now."""

    promoted: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    version: str = ""
    previous_champion: str | None = None
    changed: bool = False

    def render(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        was = ""
        if self.previous_champion and self.previous_champion != self.version:
            was = f" (champion was v{self.previous_champion})"
        return (
            f"{verdict}: {self.model_name} v{self.version}{was}\n"
            f"reason: {self.reason}\n"
            f"evidence: {json.dumps(self.evidence, indent=2, sort_keys=True)}"
        )


def _mean(values: dict[str, float], keys: list[str] | None = None) -> float | None:
    keys = sorted(values) if keys is None else keys
    return sum(values[k] for k in keys) / len(keys) if keys else None


def _judge(
    cand: dict[str, float],
    reference: dict[str, float] | None,
    versus: str,
    margin: float,
    max_reg: float,
    floor: float | None = None,
) -> tuple[bool, str, dict[str, Any]]:
    """(promote?, reason, comparison evidence) for primary-metric values per benchmark, against `reference`
    (the champion's or the start model's values, named `versus`; None: nothing to compare with)."""
    if not cand:
        return False, "not evaluated: no eval.<benchmark>.<primary> tags on this version", {}
    if floor is not None and _mean(cand) < floor:  # type: ignore[operator]
        return False, f"mean {_mean(cand):.4f} is below the floor {floor}", {"floor": floor}
    if reference is None:
        return True, "first evaluated version: no champion and no start-model evaluation to compare with", {}
    if not reference:
        return False, f"{versus} has no eval tags for the primary metric: evaluate it first", {}
    common = sorted(set(cand) & set(reference))
    if not common:
        return False, f"no benchmark in common with {versus} ({sorted(reference)})", {}
    cand_mean, ref_mean = _mean(cand, common), _mean(reference, common)
    delta = cand_mean - ref_mean  # type: ignore[operator]
    drops = {b: reference[b] - cand[b] for b in common}
    regressions = {b: d for b, d in drops.items() if d > max_reg}
    evidence = {
        "compared_to": versus,
        "benchmarks_compared": common,
        "candidate_mean": cand_mean,
        "reference_mean": ref_mean,
        "delta": delta,
        "drops": drops,
    }
    if regressions:
        worst = max(regressions, key=regressions.get)  # type: ignore[arg-type]
        return False, f"{worst} regresses by {regressions[worst]:.4f} > max_regression {max_reg}", evidence
    said = f"mean {cand_mean:.4f} vs {versus} {ref_mean:.4f}"
    if delta <= margin:
        return False, f"{said}: {delta:+.4f} does not beat the margin {margin}", evidence
    return True, f"{said}: {delta:+.4f} beats the margin {margin}", evidence


def check_gate_inputs(margin: Any, max_regression: Any) -> tuple[float, float]:
    """`margin` and `max_regression` as finite floats (`max_regression` >= 0), else a `TgrlError`: a NaN
    margin would make every comparison false and promote anything."""
    out = []
    for name, value in (("margin", margin), ("max_regression", max_regression)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise TgrlError(f"promotion {name} must be a finite number, got {value!r}", hint="e.g. 0.01")
        out.append(number)
    if out[1] < 0:
        raise TgrlError(f"promotion max_regression must be >= 0, got {max_regression!r}")
    return out[0], out[1]


# ------------------------------------------------------------------------------------ the gate
def promote(
    model_name: str,
    version: str | int,
    primary: str = "accuracy",
    margin: float = 0.0,
    max_regression: float = 0.05,
    *,
    tracking_uri: str | None = None,
    checksums: bool = True,
    lock_wait_s: float = LOCK_WAIT_S,
    baseline: dict[str, Any] | None = None,
    floor: float | None = None,
) -> PromotionDecision:
    """Run the promotion gate for `model_name` version `version` (see the module docstring).
    `baseline`: the start model's eval metrics (an `evaluate` results.json payload or flat
    `{benchmark.metric: value}`), the reference while there is no champion. `floor`: the least mean primary
    metric a candidate may have. `checksums=False` verifies the artifact listing only (no download)."""
    margin, max_regression = check_gate_inputs(margin, max_regression)
    if floor is not None:
        floor = check_gate_inputs(floor, 0.0)[0]
    start = None if baseline is None else metrics_from_tags(eval_tags(baseline), primary)
    client, version = registry_client(tracking_uri), str(version)
    with mlflow_errors(f"reading {model_name!r} v{version} from the registry"):
        candidate = client.get_model_version(model_name, version)
        current = _alias(client, model_name)
    cand = metrics_from_tags(candidate.tags, primary)
    evidence: dict[str, Any] = {
        "primary": metric_key(primary),
        "margin": margin,
        "max_regression": max_regression,
        "candidate": {"version": version, "per_benchmark": cand, "mean": _mean(cand)},
        "floor": floor,
    }
    if start is not None:
        evidence["start_model"] = {"per_benchmark": start, "mean": _mean(start)}
    broken = None
    if cand and current != version:  # verified outside the lock: a download can take long
        try:
            verify_version(model_name, version, checksums=checksums, tracking_uri=tracking_uri)
        except TgrlError as err:
            broken = f"artifacts failed verification: {err}"
    with PromotionLock(client, model_name, wait_s=lock_wait_s) as lock:
        return _decide_and_move(client, lock, model_name, version, primary, cand, evidence, broken)


def _alias(client: Any, model_name: str) -> str | None:
    """The version `@champion` points at, as a string (the local store answers ints), or None."""
    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    return None if version is None else str(version)


def _decide_and_move(
    client: Any,
    lock: PromotionLock,
    model_name: str,
    version: str,
    primary: str,
    cand: dict[str, float],
    evidence: dict[str, Any],
    broken: str | None,
) -> PromotionDecision:
    """Under the lock: read the champion, judge, move the alias (re-checked), record the decision."""
    with mlflow_errors(f"reading the champion of {model_name!r}"):
        champion = _alias(client, model_name)
        champ_tags = client.get_model_version(model_name, champion).tags if champion else {}
    if champion is not None:
        champ = metrics_from_tags(champ_tags, primary)
        evidence["champion"] = {"version": champion, "per_benchmark": champ, "mean": _mean(champ)}
    decision = PromotionDecision(False, "", evidence, model_name, version, champion)
    if champion == version:
        decision.promoted, decision.reason = True, "already champion: nothing changed"
        return decision
    if broken:
        decision.reason = broken
    else:
        reference = evidence.get("champion", evidence.get("start_model", {})).get("per_benchmark")
        versus = f"champion v{champion}" if champion else "the start model"
        decision.promoted, decision.reason, comparison = _judge(
            cand, reference, versus, evidence["margin"], evidence["max_regression"], evidence["floor"]
        )
        evidence.update(comparison)
    with mlflow_errors(f"recording the promotion decision on {model_name!r} v{version}"):
        if decision.promoted:
            lock.check_held()
            client.set_registered_model_alias(model_name, CHAMPION, version)
            now = _alias(client, model_name)
            if now != version:
                raise TgrlError(
                    f"champion of {model_name!r} moved to v{now} while v{version} was being promoted "
                    "(someone set the alias without the promotion lock)",
                    hint="run promote again",
                )
            if champion:
                client.set_model_version_tag(model_name, champion, "promotion.replaced_by", version)
        record = {
            "promotion.decision": "promoted" if decision.promoted else "refused",
            "promotion.reason": decision.reason[:5000],
            "promotion.compared_to": f"v{champion}"
            if champion
            else "start model"
            if "start_model" in evidence
            else "none",
            "promotion.candidate_mean": str(_mean(cand)),
            "promotion.reference_mean": str(evidence.get("reference_mean", "")),
            "promotion.evidence": json.dumps(evidence, sort_keys=True)[:90_000],
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key, value in record.items():
            client.set_model_version_tag(model_name, version, key, value)
    decision.changed = decision.promoted
    return decision
