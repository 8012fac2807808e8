"""We-Math (Qiao et al., 2024) -> `Problem`.

Expected input, as published (github.com/We-Math/We-Math, HF `We-Math/We-Math` `testmini.json`): a JSON
array of rows `{"ID": "3steps_165", "split": "testmini", "knowledge concept", "question",
"option": "A. 200.96;B. 3215.36;C. 6280;D. 32;E. No correct answer", "answer": "B",
"image_path": "3steps/image/165-3.png", "key": "3steps_3", "question number",
"knowledge concept description"}`; images are read from `--images` (default: the JSON's folder).

Every question is multiple choice: the `option` string is split into `choices` and the answer letter is
mapped to its text. `meta` keeps ID, key, question number and knowledge concept; `category` is the step
group of the key (1steps / 2steps / 3steps), the unit of We-Math's four-dimensional metrics.
"""

from __future__ import annotations

from typing import Any

from tgrl_lib.data.importers.common import (
    Converted,
    RowReject,
    choice_answer,
    image_field,
    parse_option_string,
    text_field,
)


def convert(row: dict[str, Any], key: str | None) -> Converted:
    pid = text_field(row, "ID", "id", required=key is None) or key
    question = text_field(row, "question")
    answer = text_field(row, "answer")
    parsed = parse_option_string(text_field(row, "option", "options"))
    if parsed is None:
        raise RowReject("field 'option' does not list lettered options like 'A. x;B. y'", "wrong type")
    letters, texts = parsed
    step_key = text_field(row, "key", required=False)
    meta = {
        "ID": pid,
        "key": step_key,
        "question_number": row.get("question number"),
        "knowledge_concept": text_field(row, "knowledge concept", required=False),
        "category": step_key.split("_")[0] if step_key else "all",
    }
    fields = {
        "question": question,
        "answer": choice_answer(answer, letters, texts),
        "answer_type": "multiple_choice",
        "choices": texts,
        "split": text_field(row, "split", required=False),
        "meta": meta,
    }
    paths, data = image_field(row, "image_path", "image", "decoded_image")
    return Converted(key=str(pid), fields=fields, image_paths=paths, image_bytes=data)
