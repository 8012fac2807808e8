"""Rule filters: each judges one trajectory from its text and its problem (no model, no other trajectories).

`verified`, `parse` and `format` re-score the text with `tgrl_lib.scoring.rewards` (the same scorer as the
reward and the evaluation) instead of trusting the `correct` field of the input; `grounding` checks the visual
facts the reasoning states against the problem's ground-truth `facts` with `tgrl_lib.scoring.grounding`.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field, field_validator, model_validator

from tgrl_lib.data.schema import Trajectory
from tgrl_lib.filters.base import KEEP, FilterContext, FilterParams, Verdict, reject, row_filter

# Chat/vision control tokens of Qwen-VL style models: text containing them re-enters a prompt as real
# image/turn tokens ("image features and image tokens do not match").
FORBIDDEN_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)
CONTROL_TOKEN = r"<\|[A-Za-z0-9_]+\|>"
_WORD = re.compile(r"\w+|[^\w\s]")


def _short(text: str | None, limit: int = 40) -> str:
    text = "" if text is None else str(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@row_filter("parse")
def parse(trajectory: Trajectory, context: FilterContext, params: FilterParams) -> Verdict:
    """An answer can be extracted from the text (answer tag, \\boxed{} or "The answer is X")."""
    from tgrl_lib.scoring.rewards import extract_answer

    if extract_answer(trajectory.text, context.problem(trajectory)) is None:
        return reject("no answer could be extracted from the text")
    return KEEP


@row_filter("verified")
def verified(trajectory: Trajectory, context: FilterContext, params: FilterParams) -> Verdict:
    """The extracted answer verifies against the problem's answer (re-scored, not read from `correct`)."""
    from tgrl_lib.scoring.rewards import extract_answer, verify

    problem = context.problem(trajectory)
    if verify(trajectory.text, problem):
        return KEEP
    found = extract_answer(trajectory.text, problem)
    return reject(f"answer {_short(found)} does not match {_short(problem.answer)}")


@row_filter("format")
def format_(trajectory: Trajectory, context: FilterContext, params: FilterParams) -> Verdict:
    """The text is exactly `<think>...</think><answer>...</answer>` (the format reward's rule)."""
    from tgrl_lib.scoring.rewards import has_valid_format

    return KEEP if has_valid_format(trajectory.text) else reject("not <think>...</think><answer>...</answer>")


def count_tokens(text: str, context: FilterContext) -> tuple[int, str]:
    """Tokens of `text` under the policy tokenizer (special-token text split as plain bytes, as the
    trainer tokenizes responses), or whitespace words when no policy was given."""
    tokenizer = context.tokenizer()
    if tokenizer is None:
        return len(text.split()), "words"
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return len(ids), "tokens"


class LengthParams(FilterParams):
    min_tokens: int = Field(
        1, ge=0, description="Fewest tokens (words without a policy) a response may have."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens a response may have (None: no limit)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> LengthParams:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is below min_tokens={self.min_tokens}")
        return self


@row_filter("length", LengthParams)
def length(trajectory: Trajectory, context: FilterContext, params: LengthParams) -> Verdict:
    """Token count under the policy tokenizer within [min_tokens, max_tokens] (words without a policy)."""
    n, unit = count_tokens(trajectory.text, context)
    trajectory.meta["policy_tokens" if unit == "tokens" else "words"] = n
    if n < params.min_tokens:
        return reject(f"{n} {unit}, fewer than min_tokens={params.min_tokens}")
    if params.max_tokens is not None and n > params.max_tokens:
        return reject(f"{n} {unit}, more than max_tokens={params.max_tokens}")
    return KEEP


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word n-grams of the lower-cased text (words and punctuation marks are the units)."""
    words = _WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


class RepetitionParams(FilterParams):
    ngram: int = Field(5, ge=1, le=64, description="Words per n-gram.")
    max_count: int = Field(4, ge=1, description="Most times one n-gram may occur.")
    min_distinct: float = Field(0.5, ge=0.0, le=1.0, description="Least fraction of distinct n-grams.")
    min_ngrams: int = Field(
        20, ge=1, description="Texts with fewer n-grams skip the distinct-fraction check."
    )
    max_char_run: int = Field(
        12, ge=1, le=10_000, description="Most repeats in a row of a unit of 1-8 characters."
    )


@row_filter("repetition", RepetitionParams)
def repetition(trajectory: Trajectory, context: FilterContext, params: RepetitionParams) -> Verdict:
    """No degenerate loops: no word n-gram more than `max_count` times, distinct n-grams at least
    `min_distinct` of all (texts with >= `min_ngrams`), no unit of 1-8 characters repeated more than
    `max_char_run` times in a row."""
    text, ngram = trajectory.text, params.ngram
    grams = ngrams(text, ngram)
    if grams:
        gram, count = Counter(grams).most_common(1)[0]
        if count > params.max_count:
            return reject(f"{ngram}-gram {_short(' '.join(gram))} repeated {count} times")
        distinct = len(set(grams)) / len(grams)
        if len(grams) >= params.min_ngrams and distinct < params.min_distinct:
            return reject(f"only {distinct:.0%} of {ngram}-grams are distinct")
    run = re.search(r"(.{1,8}?)\1{" + str(params.max_char_run) + ",}", text, flags=re.DOTALL)
    if run:
        times = len(run.group(0)) // len(run.group(1))
        return reject(f"{_short(run.group(1), 12)} repeated {times} times in a row")
    return KEEP


class SpecialTokensParams(FilterParams):
    forbidden: list[str] | None = Field(
        None, description="Token strings refused in the text (None: the Qwen-VL control tokens)."
    )
    pattern: str | None = Field(
        CONTROL_TOKEN, max_length=1000, description="Regular expression refused in the text (None: none)."
    )

    @field_validator("forbidden")
    @classmethod
    def _non_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not token for token in value):
            raise ValueError("an empty string would match every text")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err})") from None
        return value


@row_filter("special_tokens", SpecialTokensParams)
def special_tokens(trajectory: Trajectory, context: FilterContext, params: SpecialTokensParams) -> Verdict:
    """No chat/vision control tokens (`<|image_pad|>`, `<|vision_start|>`, `<|im_start|>` ...) in the text:
    the listed ones, anything matching `pattern`, and the policy tokenizer's special tokens."""
    text, pattern = trajectory.text, params.pattern
    listed = list(FORBIDDEN_TOKENS if params.forbidden is None else params.forbidden)
    tokenizer = context.tokenizer()
    if tokenizer is not None:
        listed += [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 2]
    for token in listed:
        if token in text:
            return reject(f"contains special token {token}")
    if pattern:
        found = re.search(pattern, text)
        if found:
            return reject(f"contains special token {found.group(0)}")
    return KEEP


class GroundingParams(FilterParams):
    min_precision: float = Field(
        1.0, ge=0.0, le=1.0, description="Least fraction of the stated visual facts that must be true."
    )
    require_claims: bool = Field(False, description="Also reject a text that states no checkable fact.")


@row_filter("grounding", GroundingParams)
def grounding(trajectory: Trajectory, context: FilterContext, params: GroundingParams) -> Verdict:
    """The visual facts the reasoning states agree with the problem's `facts` (fraction true >=
    `min_precision`); problems without facts pass. `require_claims`: also reject when nothing checkable is
    stated."""
    from tgrl_lib.scoring.grounding import check_claims, extract_claims

    problem = context.problem(trajectory)
    if not problem.facts:
        return KEEP
    result = check_claims(extract_claims(trajectory.text), problem.facts)
    if result.stated == 0:
        return reject("states no checkable visual fact") if params.require_claims else KEEP
    precision = result.true / result.stated
    if precision < params.min_precision:
        wrong = next(d for d in result.details if d.verdict is False)
        return reject(
            f"{result.false} of {result.stated} stated facts disagree with the image, "
            f"e.g. {_short(wrong.claim.text)} but {wrong.reason}"
        )
    return KEEP
