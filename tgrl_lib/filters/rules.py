"""Rule filters: each judges one trajectory from its text and its problem (no model, no other trajectories).

`verified`, `parse` and `format` re-score the text with `tgrl_lib.scoring.rewards` (the same scorer as the
reward and the evaluation) instead of trusting the `correct` field of the input; `grounding` checks the visual
facts the reasoning states against the problem's ground-truth `facts` with `tgrl_lib.scoring.grounding`.
"""

from __future__ import annotations

import re
from collections import Counter

from tgrl_lib.data.schema import Trajectory
from tgrl_lib.filters.base import KEEP, FilterContext, Verdict, reject, row_filter

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
def parse(trajectory: Trajectory, context: FilterContext) -> Verdict:
    """An answer can be extracted from the text (answer tag, \\boxed{} or "The answer is X")."""
    from tgrl_lib.scoring.rewards import extract_answer

    if extract_answer(trajectory.text, context.problem(trajectory)) is None:
        return reject("no answer could be extracted from the text")
    return KEEP


@row_filter("verified")
def verified(trajectory: Trajectory, context: FilterContext) -> Verdict:
    """The extracted answer verifies against the problem's answer (re-scored, not read from `correct`)."""
    from tgrl_lib.scoring.rewards import extract_answer, verify

    problem = context.problem(trajectory)
    if verify(trajectory.text, problem):
        return KEEP
    found = extract_answer(trajectory.text, problem)
    return reject(f"answer {_short(found)} does not match {_short(problem.answer)}")


@row_filter("format")
def format_(trajectory: Trajectory, context: FilterContext) -> Verdict:
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


@row_filter("length")
def length(
    trajectory: Trajectory, context: FilterContext, *, min_tokens: int = 1, max_tokens: int | None = None
) -> Verdict:
    """Token count under the policy tokenizer within [min_tokens, max_tokens] (words without a policy)."""
    n, unit = count_tokens(trajectory.text, context)
    trajectory.meta["policy_tokens" if unit == "tokens" else "words"] = n
    if n < min_tokens:
        return reject(f"{n} {unit}, fewer than min_tokens={min_tokens}")
    if max_tokens is not None and n > max_tokens:
        return reject(f"{n} {unit}, more than max_tokens={max_tokens}")
    return KEEP


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word n-grams of the lower-cased text (words and punctuation marks are the units)."""
    words = _WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


@row_filter("repetition")
def repetition(
    trajectory: Trajectory,
    context: FilterContext,
    *,
    ngram: int = 5,
    max_count: int = 4,
    min_distinct: float = 0.5,
    min_ngrams: int = 20,
    max_char_run: int = 12,
) -> Verdict:
    """No degenerate loops: no word n-gram more than `max_count` times, distinct n-grams at least
    `min_distinct` of all (texts with >= `min_ngrams`), no unit of 1-8 characters repeated more than
    `max_char_run` times in a row."""
    text = trajectory.text
    grams = ngrams(text, ngram)
    if grams:
        gram, count = Counter(grams).most_common(1)[0]
        if count > max_count:
            return reject(f"{ngram}-gram {_short(' '.join(gram))} repeated {count} times")
        distinct = len(set(grams)) / len(grams)
        if len(grams) >= min_ngrams and distinct < min_distinct:
            return reject(f"only {distinct:.0%} of {ngram}-grams are distinct")
    run = re.search(r"(.{1,8}?)\1{" + str(max_char_run) + ",}", text, flags=re.DOTALL)
    if run:
        times = len(run.group(0)) // len(run.group(1))
        return reject(f"{_short(run.group(1), 12)} repeated {times} times in a row")
    return KEEP


@row_filter("special_tokens")
def special_tokens(
    trajectory: Trajectory,
    context: FilterContext,
    *,
    forbidden: list[str] | None = None,
    pattern: str | None = CONTROL_TOKEN,
) -> Verdict:
    """No chat/vision control tokens (`<|image_pad|>`, `<|vision_start|>`, `<|im_start|>` ...) in the text:
    the listed ones, anything matching `pattern`, and the policy tokenizer's special tokens."""
    text = trajectory.text
    listed = list(FORBIDDEN_TOKENS if forbidden is None else forbidden)
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


@row_filter("grounding")
def grounding(
    trajectory: Trajectory,
    context: FilterContext,
    *,
    min_precision: float = 1.0,
    require_claims: bool = False,
) -> Verdict:
    """The visual facts the reasoning states agree with the problem's `facts` (fraction true >=
    `min_precision`); problems without facts pass. `require_claims`: also reject when nothing checkable is
    stated."""
    from tgrl_lib.scoring.grounding import check_claims, extract_claims

    problem = context.problem(trajectory)
    if not problem.facts:
        return KEEP
    result = check_claims(extract_claims(trajectory.text), problem.facts)
    if result.stated == 0:
        return reject("states no checkable visual fact") if require_claims else KEEP
    precision = result.true / result.stated
    if precision < min_precision:
        wrong = next(d for d in result.details if d.verdict is False)
        return reject(
            f"{result.false} of {result.stated} stated facts disagree with the image, "
            f"e.g. {_short(wrong.claim.text)} but {wrong.reason}"
        )
    return KEEP
