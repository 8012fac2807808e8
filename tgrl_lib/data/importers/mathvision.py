"""MATH-Vision (Wang et al., NeurIPS 2024 D&B) -> `Problem`.

Expected input, as published (github.com/mathllm/MATH-V `data/test.jsonl`, `testmini.jsonl`; HF
`MathLLMs/MathVision` parquet with `decoded_image`): one row per line
`{"id", "question", "options": [..] (empty for free-form), "image": "images/1.jpg", "answer",
"solution", "level", "subject"}`.

Mapping: with options, `multiple_choice` whose answer (a letter A-E, or the option text) becomes the option
text; without, the answer is typed by how it is written (integer / float with its decimals / text).
`<image1>` placeholders are removed from the question (the image is shown separately). `meta` keeps level
and subject (`category` = subject).
"""

from __future__ import annotations

from typing import Any

from tgrl_lib.data.importers.common import (
    LETTERS,
    Converted,
    RowReject,
    choice_answer,
    image_field,
    infer_numeric,
    string_list,
    strip_image_tokens,
    text_field,
)


def convert(row: dict[str, Any], key: str | None) -> Converted:
    pid = text_field(row, "id", required=key is None) or key
    question = strip_image_tokens(text_field(row, "question"))
    if not question:
        raise RowReject("field 'question' is empty once image placeholders are removed", "missing field")
    answer = text_field(row, "answer")
    options = string_list(row.get("options") or [], "options")
    fields: dict[str, Any] = {"question": question, "answer": answer}
    if options:
        if len(options) > len(LETTERS):
            raise RowReject(f"{len(options)} options; at most {len(LETTERS)} are supported", "wrong type")
        letters = list(LETTERS[: len(options)])
        fields.update(
            answer_type="multiple_choice", choices=options, answer=choice_answer(answer, letters, options)
        )
    else:
        answer_type, precision = infer_numeric(answer)
        fields.update(answer_type=answer_type, precision=precision)
    subject = text_field(row, "subject", required=False)
    fields["meta"] = {"id": pid, "level": row.get("level"), "subject": subject, "category": subject or "all"}
    paths, data = image_field(row, "decoded_image", "image")
    return Converted(key=str(pid), fields=fields, image_paths=paths, image_bytes=data)
