"""Reading the final answer out of a response and deciding whether it matches a problem's ground truth.

This is the one scorer behind the RL reward, the trajectory filters and the benchmark numbers
(`tgrl_lib.scoring.rewards` wraps it), so training and evaluation can never disagree about what is correct.

Extraction (`extract_answer`), first rule that applies wins:
1. the content of the last complete `<answer>...</answer>` pair (tags case-insensitive); inside it a
   `\\boxed{}` or an "Answer: X" is unwrapped. An unclosed `<answer>` is not a tag (truncated output);
   an empty tag gives None.
2. the content of the last `\\boxed{...}` (balanced braces, nesting allowed, `\\{` `\\}` are literal).
3. what follows the last "answer is" / "answer:" up to the end of its sentence or line.
`\\text{}`-like wrappers are unwrapped; surrounding whitespace, punctuation, `$`, `**`, `\\( \\)` stripped.

Matching (`match_answer`) by `problem.answer_type`:
- numbers (`integer`, `float`): one number, optionally with a sign, currency (`$5`), thousands separators
  (`1,234`; `12,5` is refused as ambiguous), a fraction (`3/4`, `\\frac{3}{4}`, `\\dfrac`), scientific
  notation (`1.5e3`, `1.5 \\times 10^{3}`), a number word up to twenty, `x = ` in front, and up to four unit
  words behind (`12 cm`, `50%`, `30°`; `problem.unit` is also stripped). Units are ignored, never
  converted: `50%` is 50 (MathVista keeps 50 for "50%"; 0.5 does not match it). Integers compare exactly
  (`3.0` equals 3). Floats compare after rounding both sides half-up at `problem.precision` decimals when it
  is set, else with relative tolerance 1e-6 (exact when the truth is 0). Values are exact fractions, so
  `1/3` vs `0.333333` is decided by the tolerance, not by binary float noise.
- `multiple_choice` (`answer` is the correct choice's text, MathVista's convention): a letter alone
  (`B`, `(b)`, `B.`, `B)`, `option B`) maps through `choices`; else the choice text (or an equal number);
  else letter plus text (`B. red`) when both name the same choice. A letter wins over a choice whose text
  is a letter, since the prompt asks for letters.
- `text`: equal token sequences after case folding; punctuation and LaTeX commands are dropped,
  numbers stay whole (`3.5` is not `35`).
Never substring matching and no fuzzy nearest-choice (MathVista's Levenshtein fallback and
lmms-eval's LLM judge are left out): `17` does not match 7, `reddish` not red, `A or B` nothing.

Every scan is linear in the text: manual brace matching, regexes without nested ambiguous quantifiers,
and numbers longer than `MAX_NUMBER_CHARS` refused before parsing.
"""

from __future__ import annotations

import math
import re
from collections import deque
from fractions import Fraction

from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError

MAX_NUMBER_CHARS = 128  # a numeric answer longer than this is not a number (bounds all numeric parsing)
MAX_UNIT_WORDS = 4
MAX_PRECISION = 30  # rounding beyond 30 decimals is exact comparison for any answer we can parse
REL_TOL = Fraction(1, 10**6)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ---------------------------------------------------------------------------------------------- extraction
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_ANSWER_PHRASE = re.compile(r"\banswer\**\s*(?:is\b|:)\s*:?", re.IGNORECASE)  # also **Answer**:
_LATEX_WRAPPER = re.compile(r"\\(?:text|textrm|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_EDGE_CHARS = " \t\r\n\f\v,;:!?$*`\"'“”‘’"  # stripped at both ends; "." only at the end (".5")


def _last_match(pattern: re.Pattern[str], text: str, end: int | None = None) -> re.Match[str] | None:
    last = deque(pattern.finditer(text, 0, len(text) if end is None else end), maxlen=1)
    return last[0] if last else None


def _last_tag_content(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>`, or None when there is no closed pair."""
    close = _last_match(_ANSWER_CLOSE, text)
    if close is None:
        return None
    opening = _last_match(_ANSWER_OPEN, text, close.start())
    return None if opening is None else text[opening.end() : close.start()]


def last_boxed(text: str) -> str | None:
    """Content of the `\\boxed{...}` that closes last, by one left-to-right brace scan (linear time).

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}}, not \\boxed{3")
    '\\\\frac{1}{2}'
    """
    starts = [i for i in (text.find("\\boxed"), text.find("\\fbox")) if i >= 0]
    if not starts:
        return None
    stack: list[int] = []  # content start for a box, -1 for a plain brace
    found: tuple[int, int] | None = None
    # Braces before the first box cannot change which braces close a box: start the scan there.
    for token in _BOX_TOKEN.finditer(text, min(starts)):
        symbol = token.group()
        if symbol[-1] == "{" and len(symbol) > 2:  # \boxed{ or \fbox{
            stack.append(token.end())
        elif symbol == "{":
            stack.append(-1)
        elif symbol == "}" and stack:
            start = stack.pop()
            if start >= 0:
                found = (start, token.start())
    return None if found is None else text[found[0] : found[1]]


def _after_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:", to the end of its sentence or line."""
    phrase = _last_match(_ANSWER_PHRASE, text)
    if phrase is None:
        return None
    start = phrase.end()
    while start < len(text) and text[start].isspace():  # "The answer is:\n42"
        start += 1
    stop = text.find("\n", start)
    line = text[start : len(text) if stop < 0 else stop]
    end = _SENTENCE_END.search(line)
    return line if end is None else line[: end.start()]


def clean_answer(answer: str) -> str:
    """Unwrap `\\text{}`-like commands; strip whitespace, punctuation, `$`, `**`, `\\( \\)` around an answer.

    >>> clean_answer("  **$-3.5$**. ")
    '-3.5'
    """
    text = _LATEX_WRAPPER.sub(r"\1", answer)  # \text{B} -> B
    text = text.lstrip(_EDGE_CHARS).rstrip(_EDGE_CHARS + ".")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right):
            text = text[2:-2].lstrip(_EDGE_CHARS).rstrip(_EDGE_CHARS + ".")
    return text


def _unwrap_boxes(answer: str, depth: int = 3) -> str:
    for _ in range(depth):  # \boxed{\boxed{3}}; bounded so that hostile nesting stays linear
        inner = answer.strip()
        if not (inner.startswith(("\\boxed", "\\fbox")) and inner.endswith("}")):
            break
        boxed = last_boxed(inner)
        if boxed is None:
            break
        answer = boxed
    return answer


def extract_answer(text: str, problem: Problem | None = None) -> str | None:
    """The final answer stated in `text`, or None (rules in the module docstring).

    `problem` is accepted so that every scorer call has the same shape; the rules do not depend on it.

    >>> extract_answer("<think>2 + 1</think><answer> 3 </answer>")
    '3'
    >>> extract_answer(r"... so the total is \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("Counting again, the answer is (B) red.")
    '(B) red'
    >>> extract_answer("<answer>7") is None
    True
    """
    if not text:
        return None
    content = _last_tag_content(text)
    if content is not None:
        inner = last_boxed(content)
        if inner is None:
            inner = _after_answer_phrase(content)
        answer = content if inner is None else inner
    else:
        answer = last_boxed(text)
        if answer is None:
            answer = _after_answer_phrase(text)
    if answer is None:
        return None
    answer = clean_answer(_unwrap_boxes(answer))
    return answer or None


# ------------------------------------------------------------------------------------------------- numbers
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_SIGNED = r"[+-]?\s*(?:" + _UNSIGNED + r")"
_DECIMAL = re.compile(
    r"(?P<sign>[+-]?)\s*[€£¥]?\s*(?P<num>" + _UNSIGNED + r")"
    r"(?:[eE](?P<e>[+-]?\d{1,4}))?"
    r"(?:\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*(?P<p>[+-]?\d{1,4})\s*\}?)?",
    re.ASCII,
)
_SLASH = re.compile(r"(?P<a>" + _SIGNED + r")\s*/\s*(?P<b>" + _SIGNED + r")", re.ASCII)
_FRAC = re.compile(
    r"(?P<sign>[+-]?)\s*\\frac\s*(?:\{\s*(?P<a>" + _SIGNED + r")\s*\}\s*\{\s*(?P<b>" + _SIGNED + r")\s*\}"
    r"|(?P<c>\d)\s*(?P<d>\d))",
    re.ASCII,
)
_NUMBER_WORDS = (  # index = value
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    + ("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
    + ("nineteen", "twenty")
)
_WORD = re.compile(r"(?P<w>" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b", re.I)
_VARIABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\s*=\s*")  # "x = 3"
_EXPONENT = r"(?:\^\{?-?\d\}?|[²³])?"
_UNIT_WORD = re.compile(r"(?:[^\W\d_]+\.?|°[CFcf]?|%)" + _EXPONENT + r"(?:/[^\W\d_]+" + _EXPONENT + r")?")
_UNIT_SLASH = re.compile(r"\s*/\s*")
# Words that make "3 or 4", "3 to 5", "3 and four" hedges rather than a number with a unit.
_CONNECTIVES = frozenset(
    ("or", "and", "to", "nor", "not", "vs", "versus", "plus", "minus", "times", "over", "divided", "by")
    + ("than", "but", "either", "neither")
)
_NUMBER_NOISE = (
    ("\\$", ""),
    ("$", ""),
    ("\\%", "%"),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", " "),
    ("\\:", " "),
    ("~", " "),
    ("{,}", ","),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", "°"),
    ("^\\circ", "°"),
    ("\\circ", "°"),
    ("\\degree", "°"),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\u2212", "-"),  # unicode minus
    ("\u2013", "-"),  # en dash used as minus
)


def _strip_unit(text: str, unit: str | None) -> str:
    """Remove `unit` at the end (`12 cm`) or start (`$5`) of `text`, case-insensitively."""
    unit = (unit or "").strip()
    if not unit or len(text) <= len(unit):
        return text
    if text[-len(unit) :].casefold() == unit.casefold():
        return text[: -len(unit)].rstrip()
    if text[: len(unit)].casefold() == unit.casefold():
        return text[len(unit) :].lstrip()
    return text


def _is_unit_tail(tail: str) -> bool:
    """True for nothing, or up to four unit-like words (`cm`, `cm^2`, `m/s`, `%`, `°C`, `square feet`)."""
    words = _UNIT_SLASH.sub("/", tail).split()
    if len(words) > MAX_UNIT_WORDS:
        return False
    return all(_UNIT_WORD.fullmatch(w) and w.casefold().rstrip(".") not in _CONNECTIVES for w in words)


def _signed_fraction(text: str) -> Fraction:
    return Fraction(re.sub(r"[\s,]", "", text))


def _head_value(match: re.Match[str]) -> Fraction | None:
    """The exact value of a matched number head (None for a zero denominator)."""
    parts = match.groupdict()
    if "w" in parts:
        return Fraction(_NUMBER_WORDS.index(parts["w"].lower()))
    if "num" in parts:
        value = Fraction(parts["num"].replace(",", ""))
        exponent = int(parts["e"] or 0) + int(parts["p"] or 0)
        value *= Fraction(10) ** exponent
        return -value if parts["sign"] == "-" else value
    if parts.get("c") is not None:  # \frac12
        numerator, denominator = Fraction(parts["c"]), Fraction(parts["d"])
    else:
        numerator, denominator = _signed_fraction(parts["a"]), _signed_fraction(parts["b"])
    if denominator == 0:
        return None
    value = numerator / denominator
    return -value if parts.get("sign") == "-" else value


def parse_number(text: str, unit: str | None = None) -> Fraction | None:
    """The exact value of a single numeric answer, or None when `text` is not exactly one number.

    >>> parse_number("1,234.5 cm"), parse_number(r"-\\dfrac{3}{4}"), parse_number("1.5 \\\\times 10^{3}")
    (Fraction(2469, 2), Fraction(-3, 4), Fraction(1500, 1))
    >>> parse_number("7 or 17") is None
    True
    """
    text = text.strip()
    if not text or len(text) > MAX_NUMBER_CHARS:
        return None
    for old, new in _NUMBER_NOISE:
        text = text.replace(old, new)
    text = _LATEX_WRAPPER.sub(r" \1", text).strip()
    while len(text) > 2 and text[0] + text[-1] in ("{}", "()"):  # {3}, (-3)
        text = text[1:-1].strip()
    text = _strip_unit(text, unit)
    prefix = _VARIABLE.match(text)
    if prefix:
        text = text[prefix.end() :]
    for pattern in (_FRAC, _SLASH, _DECIMAL, _WORD):
        head = pattern.match(text)
        if head and _is_unit_tail(text[head.end() :]):
            return _head_value(head)
    return None


def _round_half_up(value: Fraction, digits: int) -> Fraction:
    scale = 10**digits
    magnitude = math.floor(abs(value) * scale + Fraction(1, 2))
    return Fraction(magnitude if value >= 0 else -magnitude, scale)


def numbers_equal(
    pred: Fraction, gold: Fraction, *, integer: bool = False, precision: int | None = None
) -> bool:
    """Exact for integers; half-up rounding at `precision` decimals; else relative tolerance 1e-6.

    >>> numbers_equal(Fraction(1449, 1000), Fraction(145, 100), precision=2)
    True
    """
    if integer:
        return pred == gold
    if precision is not None:
        digits = min(precision, MAX_PRECISION)
        return _round_half_up(pred, digits) == _round_half_up(gold, digits)
    return abs(pred - gold) <= REL_TOL * abs(gold)


def _gold_number(problem: Problem) -> Fraction:
    gold = parse_number(problem.answer, problem.unit)
    if gold is None:
        raise TgrlError(
            f"problem {problem.id!r}: answer {problem.answer!r} is not a number but answer_type is "
            f"{problem.answer_type!r}",
            hint="fix the answer in the dataset, or make the problem a `text` problem",
        )
    return gold


# -------------------------------------------------------------------------------------- text and choices
_TOKEN = re.compile(r"(?<!\w)-\d+(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTER_ONLY = re.compile(r"(?:(?:option|choice)\s*)?\(?([A-Za-z])\)?[.):]?", re.IGNORECASE)
_LETTER_PREFIX = re.compile(r"(?:(?:option|choice)\s*)?(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s*", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Case-folded words and whole numbers joined by single spaces; punctuation and LaTeX commands dropped.

    >>> normalize_text(r"  The  Left-most, \\text{RED} one! ")
    'the left most red one'
    >>> normalize_text("3.5"), normalize_text("-3")
    ('3.5', '-3')
    """
    text = _LATEX_COMMAND.sub(" ", text.casefold())
    return " ".join(_TOKEN.findall(text))


def _same_choice(pred: str, choice: str) -> bool:
    """`pred` names `choice`: equal normalised text, or (for numeric choices) the same number."""
    if normalize_text(pred) == normalize_text(choice):
        return True
    value = parse_number(pred)
    other = parse_number(choice) if value is not None else None
    return other is not None and value == other


def _letter_index(letter: str, choices: list[str]) -> int | None:
    index = LETTERS.find(letter.upper())
    return index if 0 <= index < len(choices) else None


def match_choice(pred: str, problem: Problem) -> bool:
    """Multiple choice: a letter, the choice text (or equal number), or letter + consistent text."""
    choices = problem.choices or []
    pred = pred.strip()
    letter = _LETTER_ONLY.fullmatch(pred)
    if letter:
        index = _letter_index(letter.group(1), choices)
        return index is not None and choices[index] == problem.answer
    named = [choice for choice in choices if _same_choice(pred, choice)]
    if named:
        return all(choice == problem.answer for choice in named)
    prefix = _LETTER_PREFIX.match(pred)
    if prefix and prefix.end() < len(pred):
        index = _letter_index(prefix.group(1) or prefix.group(2), choices)
        return (
            index is not None
            and choices[index] == problem.answer
            and _same_choice(clean_answer(pred[prefix.end() :]), choices[index])
        )
    return False


def match_answer(pred: str | None, problem: Problem) -> bool:
    """Whether the extracted answer `pred` is the problem's answer (rules in the module docstring).

    >>> p = Problem(id="p", image="i.png", question="How many?", answer="7", answer_type="integer")
    >>> match_answer("7.0", p), match_answer("17", p), match_answer("7 or 17", p)
    (True, False, False)
    """
    if pred is None or not pred.strip():
        return False
    if problem.answer_type == "multiple_choice":
        return match_choice(pred, problem)
    if problem.answer_type == "text":
        return normalize_text(pred) == normalize_text(problem.answer) != ""
    gold = _gold_number(problem)
    value = parse_number(pred, problem.unit)
    if value is None:
        return False
    return numbers_equal(value, gold, integer=problem.answer_type == "integer", precision=problem.precision)
