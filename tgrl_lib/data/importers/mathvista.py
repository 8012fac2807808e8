"""MathVista (Lu et al., ICLR 2024) -> `Problem`.

Expected input, as published (github.com/lupantech/MathVista, HF `AI4Math/MathVista`):

- `testmini.json` / `test.json`: an object keyed by pid, each row
  `{"pid", "question", "image": "images/1.jpg", "choices": [..] | null, "unit": str | null,
  "precision": float | null, "answer", "question_type": "multi_choice" | "free_form",
  "answer_type": "integer" | "float" | "text" | "list", "metadata": {"split", "source", "task", "context",
  "category", "grade", "skills", ...}, "query"}`; images are read from `--images` (default: the JSON's
  folder), trying the path as given and its file name.
- the HF parquet shards (`data/testmini-*.parquet`): the same columns plus `decoded_image`
  (`{"bytes", "path"}`); the embedded bytes are used.

Mapping: multi_choice -> `multiple_choice` with `choices` and the answer (already the choice text);
integer/float/text answer types as is, `list` -> `text`; `precision` (decimals) and `unit` kept;
`meta` keeps pid, task (as `category`), skills, grade, context and the source dataset.
"""

from __future__ import annotations

from typing import Any

from tgrl_lib.data.importers.common import (
    Converted,
    RowReject,
    image_field,
    infer_numeric,
    precision_field,
    string_list,
    text_field,
)

ANSWER_TYPES = {"integer": "integer", "float": "float", "text": "text", "list": "text"}


def convert(row: dict[str, Any], key: str | None) -> Converted:
    pid = text_field(row, "pid", required=key is None) or key
    question = text_field(row, "question")
    answer = text_field(row, "answer")
    question_type = text_field(row, "question_type")
    meta_in = row.get("metadata") or {}
    if not isinstance(meta_in, dict):
        raise RowReject("field 'metadata' must be an object", "wrong type")
    fields: dict[str, Any] = {
        "question": question,
        "answer": answer,
        "unit": text_field(row, "unit", required=False),
    }
    if question_type == "multi_choice":
        choices = string_list(row.get("choices"), "choices")
        if answer not in choices:
            raise RowReject(f"answer {answer!r} is not one of the choices", "answer not in choices")
        fields.update(answer_type="multiple_choice", choices=choices)
    elif question_type == "free_form":
        declared = text_field(row, "answer_type", required=False)
        if declared is not None and declared not in ANSWER_TYPES:
            raise RowReject(f"unknown answer_type {declared!r}", "wrong type")
        answer_type = ANSWER_TYPES[declared] if declared else infer_numeric(answer)[0]
        precision = precision_field(row.get("precision"))
        if answer_type == "float" and precision is None:
            precision = infer_numeric(answer)[1]
        fields.update(answer_type=answer_type, precision=precision if answer_type == "float" else None)
    else:
        raise RowReject(
            f"question_type must be multi_choice or free_form, got {question_type!r}", "wrong type"
        )
    keep = ("task", "category", "context", "grade", "skills", "language", "source")
    meta = {
        ("source_dataset" if k == "source" else k): meta_in[k] for k in keep if meta_in.get(k) is not None
    }
    meta["pid"] = pid
    meta["category"] = meta_in.get("task") or meta_in.get("category") or "all"
    fields.update(meta=meta, split=str(meta_in.get("split") or "") or None)
    paths, data = image_field(row, "decoded_image", "image")
    return Converted(key=str(pid), fields=fields, image_paths=paths, image_bytes=data)
