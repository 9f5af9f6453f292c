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


def read_labels(path: str | os.PathLike[str]) -> Labels:
    """Parse a labels CSV (``slide_id,<class>,...``; values 0/1; optional ``split`` column)."""
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
    if header[0].lower() not in ("slide_id", "slide", "case_id", "id"):
        raise InputError(
            f"{str(p)!r}: the first column is {header[0]!r}; expected a header "
            "'slide_id,<class>,...' with the slide ids (file stems) in the first column"
        )
    split_col = next((i for i, h in enumerate(header) if h.lower() == "split" and i > 0), None)
    class_cols = [i for i in range(1, len(header)) if i != split_col]
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
        sid = row[0].strip()
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
