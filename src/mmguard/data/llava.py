"""LLaVA-style conversation JSON: a list of entries with an image and turns.

    [{"id": "0001", "image": "coco/0001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                        {"from": "gpt", "value": "A cat."}, ...]}, ...]

Each human turn followed by a gpt turn is one triple. The ``<image>``
placeholder is not part of the prompt text and is kept where it was when the
file is written back. Entries without an image (text-only turns) are not
protectable; they are copied to the output unchanged.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from mmguard.data.manifests import make_record, safe_image_key
from mmguard.data.records import Dataset, Record, Rejected
from mmguard.errors import MMGuardError

IMAGE_TOKEN = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def looks_like_llava(data: Any) -> bool:
    return isinstance(data, list) and any(
        isinstance(entry, dict) and "conversations" in entry for entry in data)


def _text_parts(value: str) -> list[str]:
    """The value split around <image> tokens: text, token, text, token, ..."""
    return re.split(f"({re.escape(IMAGE_TOKEN)})", value)


def prompt_text(value: str) -> str:
    """The prompt without the <image> token(s), whitespace joined once."""
    return " ".join(part.strip() for part in _text_parts(value)
                    if part != IMAGE_TOKEN and part.strip())


def replace_prompt(value: str, new_prompt: str) -> str:
    """Put `new_prompt` where the old prompt text was, keeping the <image> token."""
    parts = _text_parts(value)
    texts = [i for i, part in enumerate(parts) if part != IMAGE_TOKEN and part.strip()]
    if len(texts) == 1:
        # Keep the whitespace around the text, e.g. the newline after <image>.
        part = parts[texts[0]]
        lead = part[: len(part) - len(part.lstrip())]
        trail = part[len(part.rstrip()):]
        parts[texts[0]] = f"{lead}{new_prompt}{trail}"
        return "".join(parts)
    # The token sits inside the prompt (or there is no text): LLaVA's usual layout.
    return f"{IMAGE_TOKEN}\n{new_prompt}" if IMAGE_TOKEN in value else new_prompt


def read_llava(path: Path, data: list[Any]) -> Dataset:
    root = path.parent
    records: list[Record] = []
    rejected: list[Rejected] = []
    for index, entry in enumerate(data):
        name = entry.get("id", index) if isinstance(entry, dict) else index
        where = f"{path.name} entry {index} (id {name})"
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            rejected.append(Rejected(where, "expected an object with a 'conversations' list"))
            continue
        if "image" not in entry:
            continue  # text-only conversation: nothing to protect, copied as is
        key, problem = safe_image_key(entry.get("image"), root)
        if problem:
            rejected.append(Rejected(where, problem))
            continue
        turns = entry["conversations"]
        found = False
        for turn_index in range(len(turns) - 1):
            asked, answered = turns[turn_index], turns[turn_index + 1]
            if not (isinstance(asked, dict) and isinstance(answered, dict)):
                continue
            if asked.get("from") in HUMAN_ROLES and answered.get("from") in ASSISTANT_ROLES:
                fields = {"prompt": prompt_text(str(asked.get("value", ""))),
                          "response": answered.get("value")}
                records.append(make_record("triples", key, root, fields,
                                           f"{where} turn {turn_index}",
                                           raw=(index, turn_index)))
                found = True
        if not found:
            rejected.append(Rejected(where, "no human turn followed by a gpt turn"))
    if not records and not rejected:
        raise MMGuardError(f"{path}: no conversations with images")
    return Dataset(kind="triples", records=records, source=str(path), fmt="llava", root=root,
                   meta={"entries": data, "name": path.name}, rejected=rejected)


def write_llava(path: Path, dataset: Dataset, rows: list[tuple[Record, str]]) -> None:
    """Write the entries whose every turn was protected, plus text-only entries."""
    entries = dataset.meta["entries"]
    turns_of_entry: dict[int, int] = {}
    for record in dataset.records:
        turns_of_entry[record.raw[0]] = turns_of_entry.get(record.raw[0], 0) + 1
    updated: dict[int, dict[str, Any]] = {}
    done_turns: dict[int, int] = {}
    for record, image_path in rows:
        entry_index, turn_index = record.raw
        entry = updated.setdefault(entry_index, copy.deepcopy(entries[entry_index]))
        entry["image"] = image_path
        turn = entry["conversations"][turn_index]
        turn["value"] = replace_prompt(str(turn.get("value", "")), record.prompt)
        done_turns[entry_index] = done_turns.get(entry_index, 0) + 1
    output = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "image" not in entry:
            output.append(entry)
        elif index in updated and done_turns[index] == turns_of_entry[index]:
            output.append(updated[index])
    path.write_text(json.dumps(output, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
