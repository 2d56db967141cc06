"""A Hugging Face `datasets` directory (written by `save_to_disk`) as input.

Optional extra: ``pip install mmguard[hf]``. The image column may hold
decoded images (the ``Image`` feature) or paths relative to the directory.
Images stay inside the dataset and are decoded on demand. The protected output
is a JSONL manifest (`manifest.jsonl`) with the same text columns and image
paths to the protected PNGs, which `datasets.load_dataset("json", ...)` reads.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from mmguard.data.manifests import kind_from_columns, make_record, safe_image_key
from mmguard.data.records import Dataset, ImageRef, Record, Rejected
from mmguard.errors import MMGuardError

NAME_COLUMNS = ("file_name", "filename", "image_id", "id")


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists())


def read_hf_dataset(path: Path, split: str | None) -> Dataset:
    try:
        import datasets
    except ImportError:
        raise MMGuardError(
            f"{path} is a Hugging Face datasets directory; install the extra with "
            "`pip install 'mmguard[hf]'` to read it") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise MMGuardError(f"{path} has splits {', '.join(loaded)}; choose one with --split")
        loaded = loaded[split]
    elif split is not None:
        raise MMGuardError(f"{path} holds one dataset without splits; drop --split {split}")
    source = f"{path}" + (f" [{split}]" if split else "")
    kind = kind_from_columns(loaded.column_names, source)
    name_column = next((c for c in NAME_COLUMNS if c in loaded.column_names), None)
    # Decoding every image up front would load the whole set into memory; the
    # image column is read undecoded and each ImageRef decodes its own row.
    undecoded = loaded.cast_column("image", datasets.Image(decode=False)) \
        if isinstance(loaded.features.get("image"), datasets.Image) else loaded
    text_columns = [c for c in loaded.column_names if c != "image"]
    texts = undecoded.select_columns(text_columns).to_list() if text_columns else []
    records: list[Record] = []
    rejected: list[Rejected] = []
    for index, row in enumerate(texts):
        where = f"{path.name} row {index}"
        cell = undecoded[index]["image"]
        ref, problem = _image_ref(cell, index, row.get(name_column) if name_column else None, path)
        if problem:
            rejected.append(Rejected(where, problem))
            continue
        records.append(_record(kind, ref, row, where))
    return Dataset(kind=kind, records=records, source=source, fmt="hf", root=path,
                   meta={"columns": text_columns}, rejected=rejected)


def _record(kind, ref: ImageRef, row: dict[str, Any], where: str) -> Record:
    return replace(make_record(kind, ref.key, Path("."), row, where, raw=row), image=ref)


def _image_ref(cell: Any, index: int, name: Any, root: Path) -> tuple[ImageRef | None, str | None]:
    if isinstance(cell, dict) and cell.get("bytes"):
        stem = posixpath.splitext(str(name))[0] if name not in (None, "") else f"{index:06d}"
        key, problem = safe_image_key(f"{stem}.png", root)
        if problem:
            return None, problem
        data = cell["bytes"]
        return ImageRef(key=key, opener=lambda: Image.open(io.BytesIO(data))), None
    relative = cell.get("path") if isinstance(cell, dict) else cell
    rel_key, problem = safe_image_key(relative, root)
    if problem:
        return None, problem
    return ImageRef(key=rel_key, path=root / rel_key), None
