"""The prompt every step shows the policy: system instruction, image, question and lettered options.

One prompt for training, generation, filtering and evaluation, so the policy is scored on exactly what it
was trained on. The response format `<think>...</think><answer>...</answer>` is the R1-style format used by
the multimodal RLVR recipes (MM-Eureka, VPPO, LUFFY); multiple-choice options are rendered "(A) text" as in
the MathVista prompts. Rendering goes through the processor's own chat template, so a real Qwen-VL
checkpoint and the tiny model get the same conversation in their own format.
"""

from __future__ import annotations

from typing import Any

from tgrl_lib.errors import TgrlError

SYSTEM_PROMPT = (
    "Look at the image and state what you see, then reason step by step inside <think> </think> and give "
    "only the final answer inside <answer> </answer>."
)
MC_INSTRUCTION = "Answer with the option's letter."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_choices(choices: list[str]) -> str:
    """Lettered options, one per line.

    >>> print(format_choices(["red", "blue"]))
    (A) red
    (B) blue
    """
    if len(choices) > len(LETTERS):
        raise TgrlError(f"a multiple-choice question has {len(choices)} options; at most {len(LETTERS)}")
    return "\n".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def question_text(question: str, choices: list[str] | None) -> str:
    """The user's text: the question, then (multiple choice) the options and the letter instruction."""
    if not choices:
        return question.strip()
    return f"{question.strip()}\nChoices:\n{format_choices(choices)}\n{MC_INSTRUCTION}"


def build_messages(question: str, choices: list[str] | None = None, *, with_image: bool = True) -> list[dict]:
    """Chat messages: system prompt, then one user turn with the image (first) and the question."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question_text(question, choices)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def render_prompt(
    processor: Any, question: str, choices: list[str] | None = None, *, with_image: bool = True
) -> str:
    """The prompt string (chat template, generation prompt appended) that the policy continues."""
    messages = build_messages(question, choices, with_image=with_image)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
