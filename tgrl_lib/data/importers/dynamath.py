"""DynaMath (Zou et al., ICLR 2025) -> `Problem`.

Expected input, either as published:

- the seed file `dataset/dataset.json` of github.com/DynaMath/DynaMath: an object keyed by question id,
  rows `{"question", "answer", "image": "image/image1.png", "answer_type": "float" | "text" |
  "multiple choice", "subject", "level"}`;
- generated variants / HF `DynaMath/DynaMath_Sample` (JSON array, JSONL or parquet with `decoded_image`):
  rows `{"id" | "qid", "varid"?, "question", "image", "ground_truth", "answer_type": "multiple choice" |
  "float" | "int" | "text" | "free form", "subject", "knowledge_level"}`.

Mapping: `multiple choice` options are parsed from the question ("Choices: (A) yes (B) no"), the question
keeps its stem and the answer letter becomes the option text (letters only when no options are written);
`float` keeps the decimals written in the ground truth as `precision`; `int` -> integer; `text` -> text;
other types are inferred from the answer. The id is `<id>` or `<id>-v<varid>` for variants; `meta` keeps
subject and level (`category` = subject).
"""

from __future__ import annotations

from typing import Any

from tgrl_lib.data.importers.common import (
    Converted,
    RowReject,
    image_field,
    infer_numeric,
    multiple_choice_fields,
    text_field,
)


def convert(row: dict[str, Any], key: str | None) -> Converted:
    pid = text_field(row, "id", "qid", required=key is None) or key
    varid = text_field(row, "varid", required=False)
    question = text_field(row, "question")
    answer = text_field(row, "ground_truth", "answer")
    declared = (text_field(row, "answer_type", required=False) or "").lower()
    fields: dict[str, Any] = {"question": question, "answer": answer}
    if declared in ("multiple choice", "multiple_choice", "multi_choice"):
        fields.update(multiple_choice_fields(question, answer))
    elif declared in ("int", "integer"):
        if infer_numeric(answer)[0] != "integer":
            raise RowReject(f"answer_type int but answer {answer!r} is not an integer", "wrong type")
        fields["answer_type"] = "integer"
    elif declared == "float":
        answer_type, precision = infer_numeric(answer)
        if answer_type == "text":
            raise RowReject(f"answer_type float but answer {answer!r} is not a number", "wrong type")
        fields.update(answer_type="float", precision=precision)
    elif declared == "text":
        fields["answer_type"] = "text"
    else:
        answer_type, precision = infer_numeric(answer)
        fields.update(answer_type=answer_type, precision=precision)
    subject = text_field(row, "subject", required=False)
    level = text_field(row, "knowledge_level", "level", required=False)
    fields["meta"] = {
        "seed_id": pid,
        "varid": varid,
        "subject": subject,
        "level": level,
        "category": subject or "all",
    }
    paths, data = image_field(row, "decoded_image", "image")
    return Converted(
        key=f"{pid}-v{varid}" if varid else str(pid), fields=fields, image_paths=paths, image_bytes=data
    )
