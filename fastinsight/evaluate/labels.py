"""Slide labels from a CSV: ``slide_id,<class>,...`` with 0/1 values, optional ``split``."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastinsight.errors import InputError


@dataclass(frozen=True)
class Labels:
    """Slide labels from a CSV: first column the slide id, then one 0/1 column per class.

    A column named ``split`` (values train / val / test) is not a class; it fixes the split.
    """

    class_names: tuple[str, ...]
    values: Mapping[str, tuple[int, ...]]
    split: Mapping[str, str] = field(default_factory=dict)

    @property
    def slide_ids(self) -> tuple[str, ...]:
        return tuple(self.values)


ID_COLUMNS = ("slide_id", "slide", "case_id", "id")


def _columns(header: list[str], p: Path) -> tuple[int, int | None, list[int]]:
    """(slide id column, split column or None, class columns) of a labels CSV header.

    CLAM's dataset CSVs are ``case_id,slide_id,label``: the slides are named by ``slide_id``
    wherever it stands, and ``case_id`` (a patient, who may have several slides) is neither the
    id nor a class.
    """
    lower = [h.lower() for h in header]
    id_col = lower.index("slide_id") if "slide_id" in lower else 0
    if lower[id_col] not in ID_COLUMNS:
        raise InputError(
            f"{str(p)!r}: the first column is {header[0]!r}; expected a header "
            "'slide_id,<class>,...' with the slide ids (file stems) in the first column"
        )
    split_col = next((i for i, h in enumerate(lower) if h == "split" and i != id_col), None)
    skip = {id_col, split_col}
    class_cols = [i for i, h in enumerate(lower) if i not in skip and h != "case_id"]
    return id_col, split_col, class_cols


def read_labels(path: str | os.PathLike[str]) -> Labels:
    """Parse a labels CSV (``slide_id,<class>,...``; values 0/1; optional ``split`` column).

    The slide ids are the ``slide_id`` column wherever it stands (CLAM's ``case_id,slide_id,
    label``), else the first column (named ``slide_id``, ``slide``, ``case_id`` or ``id``). A
    ``case_id`` column beside a ``slide_id`` one is not a class.
    """
    from fastinsight.inputs import allow_long_csv_fields

    p = Path(path).expanduser()
    allow_long_csv_fields()
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise InputError(f"labels file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read labels file {str(p)!r}: {exc}") from exc
    if len(rows) < 2:
        raise InputError(
            f"{str(p)!r} has no data rows; expected a header 'slide_id,<class>,...' and one row "
            "per slide"
        )
    header = [h.strip() for h in rows[0]]
    id_col, split_col, class_cols = _columns(header, p)
    if not class_cols:
        raise InputError(
            f"{str(p)!r}: header {header} has no class column; expected 'slide_id,<class>,...'"
        )
    names = tuple(header[i] for i in class_cols)
    if len(set(names)) != len(names) or any(not n for n in names):
        raise InputError(f"{str(p)!r}: class columns {list(names)} must be unique and non-empty")
    values: dict[str, tuple[int, ...]] = {}
    split: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(
                f"{str(p)!r} line {line}: {len(row)} fields, the header has {len(header)}"
            )
        sid = row[id_col].strip()
        if not sid:
            raise InputError(f"{str(p)!r} line {line}: empty slide id")
        if sid in values:
            raise InputError(f"{str(p)!r} line {line}: slide {sid!r} is listed twice")
        labs = []
        for i in class_cols:
            cell = row[i].strip().lower()
            if cell in ("1", "1.0", "true"):
                labs.append(1)
            elif cell in ("0", "0.0", "false"):
                labs.append(0)
            else:
                raise InputError(
                    f"{str(p)!r} line {line}: {header[i]}={row[i]!r} for slide {sid!r}; "
                    "labels must be 0 or 1"
                )
        values[sid] = tuple(labs)
        if split_col is not None:
            s = row[split_col].strip().lower()
            if s not in ("train", "val", "test", ""):
                raise InputError(
                    f"{str(p)!r} line {line}: split={row[split_col]!r}; expected train, val or test"
                )
            if s:
                split[sid] = s
    return Labels(class_names=names, values=values, split=split)
