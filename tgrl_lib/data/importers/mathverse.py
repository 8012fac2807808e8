"""MathVerse (Zhang et al., ECCV 2024) -> `Problem`.

Expected input, as published (HF `AI4Math/MathVerse`, `testmini.json`): a JSON array (or the parquet
shards, image embedded as `{"bytes", "path"}`) of rows `{"sample_index", "problem_index",
"problem_version": "Text Dominant" | "Text Lite" | "Vision Intensive" | "Vision Dominant" | "Vision Only" ...,
"question", "image": "images_version_1-4/image_1.png", "answer", "question_type": "multi-choice" |
"free-form", "metadata": {"split", "source", "subject", "subfield"}, "query_wo", "query_cot",
"question_for_eval"}`.

Multiple-choice answers are letters. When the options are written in the question
("Choices:\\nA:40°\\nB:60°"), they become `choices`, the answer becomes the choice text and the question
keeps only its stem. When they are only in the image (Vision Only), the answer stays a letter and
`choices` are the letters A-E that the question mentions (at least A-D). Free-form answers are typed by how
they are written (12 -> integer, 1.5 -> float with 1 decimal, anything else -> text).
`meta["category"]` is the problem version.
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

FALLBACK_QUESTION = "Answer the question shown in the image."


def convert(row: dict[str, Any], key: str | None) -> Converted:
    index = text_field(row, "sample_index", required=key is None) or key
    question = (
        text_field(row, "question", required=False)
        or text_field(row, "question_for_eval", required=False)
        or FALLBACK_QUESTION
    )
    answer = text_field(row, "answer")
    question_type = text_field(row, "question_type")
    meta_in = row.get("metadata") or {}
    if not isinstance(meta_in, dict):
        raise RowReject("field 'metadata' must be an object", "wrong type")
    fields: dict[str, Any] = {"question": question, "answer": answer}
    if question_type in ("multi-choice", "multi_choice"):
        fields.update(multiple_choice_fields(question, answer))
    elif question_type in ("free-form", "free_form"):
        answer_type, precision = infer_numeric(answer)
        fields.update(answer_type=answer_type, precision=precision)
    else:
        raise RowReject(
            f"question_type must be multi-choice or free-form, got {question_type!r}", "wrong type"
        )
    version = text_field(row, "problem_version", required=False)
    meta = {k: meta_in[k] for k in ("subject", "subfield", "source") if meta_in.get(k) is not None}
    meta.update(sample_index=index, problem_index=row.get("problem_index"), problem_version=version,
                category=version or "all")  # fmt: skip
    fields.update(meta=meta, split=str(meta_in.get("split") or "") or None)
    paths, data = image_field(row, "image", "decoded_image")
    return Converted(key=str(index), fields=fields, image_paths=paths, image_bytes=data)
