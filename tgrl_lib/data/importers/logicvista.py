"""LogicVista (Xiao et al., 2024) -> `Problem`.

Expected input, as published (github.com/Yijia-Xiao/LogicVista `data/dataset.json`): an object keyed by id,
rows `{"imagename": "v1_0.png", "question", "answer": "C" | "A, C" | "3", "reasoning", "skill": [..],
"capability": [..], "imagesource", "sourcelink"}`; images are in `images/` next to the JSON (or pass
`--images`).

The options are usually drawn in the image and named in the question ("Which choice (A, B, C, or D)...",
"Select answers from A-E"). A single-letter answer becomes `multiple_choice`: with the option texts when
the question writes them ("A) 10 B) 12"), else with the option letters named in the question. A single
digit answer with a "1-5" style range becomes multiple choice over those digits. Several letters
("A, C") become a `text` answer "A, C". `meta` keeps skill and capability (`category` = first skill).
"""

from __future__ import annotations

import re
from typing import Any

from tgrl_lib.data.importers.common import (
    Converted,
    choice_answer,
    image_field,
    letter_choices,
    parse_choices,
    string_list,
    text_field,
)


def _answer_fields(question: str, answer: str) -> dict[str, Any]:
    letters = [x.strip() for x in answer.split(",")]
    if len(letters) == 1 and re.fullmatch(r"[A-J]", answer):
        parsed = parse_choices(question)
        if parsed and answer in parsed[1]:
            stem, labels, texts = parsed
            return {"question": stem or question, "answer": choice_answer(answer, labels, texts),
                    "answer_type": "multiple_choice", "choices": texts}  # fmt: skip
        return {
            "answer": answer,
            "answer_type": "multiple_choice",
            "choices": letter_choices(question, answer),
        }
    span = re.search(r"\b(\d)\s*(?:-|–|to)\s*(\d)\b", question)
    if re.fullmatch(r"\d", answer) and span and int(span.group(1)) <= int(answer) <= int(span.group(2)):
        digits = [str(d) for d in range(int(span.group(1)), int(span.group(2)) + 1)]
        if len(digits) >= 2:
            return {"answer": answer, "answer_type": "multiple_choice", "choices": digits}
    if all(re.fullmatch(r"[A-J]", x) for x in letters):
        return {"answer": ", ".join(letters), "answer_type": "text"}
    return {"answer": answer, "answer_type": "text"}


def convert(row: dict[str, Any], key: str | None) -> Converted:
    pid = text_field(row, "id", required=key is None) or key
    question = text_field(row, "question")
    answer = text_field(row, "answer")
    fields: dict[str, Any] = {"question": question, **_answer_fields(question, answer)}
    skills = string_list(row.get("skill") or [], "skill")
    capability = string_list(row.get("capability") or [], "capability")
    fields["meta"] = {
        "id": pid,
        "skill": skills,
        "capability": capability,
        "category": skills[0] if skills else "all",
    }
    paths, data = image_field(row, "imagename", "image", "decoded_image")
    if paths and "/" not in paths[0]:
        paths.append(f"images/{paths[0]}")
    return Converted(key=str(pid), fields=fields, image_paths=paths, image_bytes=data)
