"""The lab's sample sheet: which file is which subject, visit and tube.

CSV with columns ``file`` (name relative to the manifest's folder),
``subject_id``, ``visit``, ``study_day``, ``tube``, ``beads_per_test``,
``sample_volume_ul``. Only ``file`` is required; unknown extra columns are
kept with the row and passed through to the results.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_COLUMNS = ("file", "subject_id", "visit", "study_day", "tube", "beads_per_test", "sample_volume_ul")


class ManifestError(ValueError):
    """The manifest itself cannot be used (missing, no ``file`` column, duplicates)."""


@dataclass
class ManifestRow:
    """One row of the manifest; numeric fields are parsed lazily so one bad
    cell fails only its own sample."""

    file: str
    path: Path
    values: dict = field(default_factory=dict)

    def text(self, column):
        value = self.values.get(column, "")
        return value.strip() if value else ""

    def number(self, column):
        """The column as float, ``None`` when empty; ``ValueError`` naming it when not a number."""
        text = self.text(column)
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"manifest column {column} is not a number: {text!r}") from None

    @property
    def extra(self):
        return {k: v for k, v in self.values.items() if k not in KNOWN_COLUMNS}


@dataclass
class Manifest:
    """Rows of a manifest, looked up by file path or, failing that, file name."""

    path: Path
    rows: list

    def lookup(self, fcs_path):
        """The row for ``fcs_path`` or ``None``."""
        fcs_path = Path(fcs_path).resolve()
        for row in self.rows:
            if row.path.resolve() == fcs_path:
                return row
        by_name = [row for row in self.rows if Path(row.file).name == fcs_path.name]
        return by_name[0] if len(by_name) == 1 else None

    def files(self):
        return [row.path for row in self.rows]


def read_manifest(path):
    """Read a manifest CSV.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Manifest

    Raises
    ------
    ManifestError
        One line, when the file is missing, has no ``file`` column or lists a
        file twice.

    Examples
    --------
    >>> m = read_manifest("sample_fcs/manifest.csv")  # doctest: +SKIP
    >>> m.rows[0].text("subject_id")  # doctest: +SKIP
    'S01'
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fieldnames = [(name or "").strip() for name in (reader.fieldnames or [])]
            if "file" not in fieldnames:
                raise ManifestError(f"{path}: manifest has no 'file' column (columns: {', '.join(fieldnames)})")
            rows, seen = [], set()
            for line_number, raw in enumerate(reader, start=2):
                values = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                name = values.get("file", "")
                if not name:
                    continue
                if name in seen:
                    raise ManifestError(f"{path}: line {line_number} lists {name} a second time")
                seen.add(name)
                rows.append(ManifestRow(file=name, path=path.parent / name, values=values))
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not UTF-8 text") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
    return Manifest(path=path, rows=rows)
