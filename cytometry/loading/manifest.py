"""The lab's sample sheet: which file is which subject, visit and tube.

CSV with columns ``file`` (name relative to the manifest's folder),
``subject_id``, ``visit``, ``study_day``, ``tube``, ``beads_per_test``,
``sample_volume_ul``, and for other counting methods ``dilution_factor``,
``lymphocytes_per_ul``, ``lymphocytes_cv``, ``counting_method``. Only
``file`` is required; unknown extra columns are kept with the row and passed
through to the results.

:func:`validate_manifest` checks a manifest against the files of a run
before any of them is analysed (misspelt columns, missing or unlisted files,
bad numbers, missing bead constants, CAR tubes without a study day) and
:func:`check_manifest` raises one :class:`ManifestError` listing every
problem with its row (numbered as a spreadsheet shows them: the header is
row 1).
"""
from __future__ import annotations

import csv
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Columns the analysis reads; anything else is passed through as ``manifest_extra``.
KNOWN_COLUMNS = ("file", "subject_id", "visit", "study_day", "tube", "beads_per_test", "sample_volume_ul",
                 "dilution_factor", "lymphocytes_per_ul", "lymphocytes_cv", "counting_method", "gates", "gate_map")
#: Numeric columns that must be > 0 when given.
POSITIVE_COLUMNS = ("beads_per_test", "sample_volume_ul", "dilution_factor", "lymphocytes_per_ul")
COUNTING_METHODS = ("auto", "beads", "volumetric", "dual-platform")


class ManifestError(ValueError):
    """The manifest itself cannot be used (missing, no ``file`` column, duplicates)."""


@dataclass
class ManifestRow:
    """One row of the manifest; numeric fields are parsed lazily so one bad
    cell fails only its own sample."""

    file: str
    path: Path
    values: dict = field(default_factory=dict)
    line: int | None = None  # row number as a spreadsheet shows it (header = 1)

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

    def path_of(self, column):
        """A column naming a file (``gates``, ``gate_map``) as a path relative to the manifest's folder, or ``None``.

        Examples
        --------
        >>> row = ManifestRow("run1/a.fcs", Path("study/run1/a.fcs"), {"gates": "review/a.xml"})
        >>> row.path_of("gates").as_posix(), row.path_of("gate_map")
        ('study/review/a.xml', None)
        """
        text = self.text(column)
        if not text:
            return None
        depth = len(Path(self.file).parts)
        folder = self.path.parents[depth - 1] if 0 < depth <= len(self.path.parents) else self.path.parent
        return folder / text

    @property
    def extra(self):
        return {k: v for k, v in self.values.items() if k not in KNOWN_COLUMNS}


@dataclass
class Manifest:
    """Rows of a manifest, looked up by file path or, failing that, file name."""

    path: Path
    rows: list
    columns: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # found while reading (duplicates, rows without a file)

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
        One line, when the file is missing, is not UTF-8 CSV or has no
        ``file`` column. Problems of single rows (a file listed twice, a row
        without a file name) are kept in ``Manifest.problems`` and reported
        by :func:`validate_manifest` with the others.

    Examples
    --------
    >>> m = read_manifest("sample_fcs/manifest.csv")
    >>> m.rows[0].text("subject_id")
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
            rows, seen, problems = [], {}, []
            for line_number, raw in enumerate(reader, start=2):
                values = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                name = values.get("file", "")
                if not name:
                    if any(values.values()):
                        problems.append(f"row {line_number}: no file name")
                    continue
                if name in seen:
                    problems.append(f"row {line_number}: lists {name} a second time (first on row {seen[name]})")
                    continue
                seen[name] = line_number
                rows.append(ManifestRow(file=name, path=path.parent / name, values=values, line=line_number))
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not UTF-8 text") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from None
    return Manifest(path=path, rows=rows, columns=fieldnames, problems=problems)


def _normalised(name):
    return "_".join(name.lower().replace("-", " ").replace("_", " ").split())


def suggest_column(name, known=KNOWN_COLUMNS):
    """The known column an unknown one was probably meant to be, or ``None``.

    Examples
    --------
    >>> suggest_column("studyday"), suggest_column("Sample Volume uL"), suggest_column("comment")
    ('study_day', 'sample_volume_ul', None)
    """
    key = _normalised(name)
    if key in known:
        return key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close:
        close = difflib.get_close_matches(key.replace("_", ""), [k.replace("_", "") for k in known], n=1, cutoff=0.8)
        close = [k for k in known if k.replace("_", "") in close]
    return close[0] if close else None


def _label(row):
    return f"row {row.line} ({row.file})" if row.line is not None else row.file


def _has_override(options, name):
    return options is not None and getattr(options, name, None) is not None


def validate_manifest(manifest, files=(), folders=(), options=None, allow_unlisted=False):
    """Every problem of ``manifest`` for a run of ``files``, one line each (empty when it can be used).

    Checked before any file is analysed: columns close to a known one
    (``studyday`` for ``study_day``), files listed but missing, FCS files
    analysed (or present in one of ``folders``) but not listed (unless
    ``allow_unlisted``), values that are not numbers or out of range, rows
    with no counting constants (beads per test and sample volume, or
    another method's inputs; one line listing the rows) and CAR tubes
    without a study day or subject (their pre-infusion reference cannot be
    linked).

    Parameters
    ----------
    manifest : Manifest
    files : iterable of Path
        The FCS files of the run.
    folders : iterable of Path
        Folders analysed whole: their ``*.fcs`` files must all be listed.
    options : cytometry.analysis.AnalysisOptions, optional
        Command-line overrides (``beads_per_test``, ``sample_volume_ul``,
        ``method``…) that make a manifest value unnecessary.
    allow_unlisted : bool

    Returns
    -------
    list of str

    Examples
    --------
    >>> m = read_manifest("sample_fcs/manifest.csv")
    >>> validate_manifest(m, m.files())
    []
    """
    problems = list(manifest.problems)
    for column in manifest.columns:
        if column in KNOWN_COLUMNS or not column:
            continue
        suggestion = suggest_column(column)
        if suggestion is not None:
            problems.append(f"unknown column {column!r} — did you mean {suggestion}?")
    for row in manifest.rows:
        if not row.path.is_file():
            problems.append(f"{_label(row)}: file not found ({row.path})")
        # A reviewer's corrected gates (and their mapping), relative to the manifest like the file.
        for column in ("gates", "gate_map"):
            if row.text(column) and not row.path_of(column).is_file():
                problems.append(f"{_label(row)}: {column} file not found ({row.path_of(column)})")
        if row.text("gate_map") and not row.text("gates"):
            problems.append(f"{_label(row)}: gate_map without gates (it maps the gates of a reviewed file)")
    listed = set()
    for row in manifest.rows:
        listed.add(row.path.resolve())
    candidates = [Path(f) for f in files]
    for folder in folders:
        candidates.extend(p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix.lower() == ".fcs")
    if not allow_unlisted:
        unlisted, seen = [], set()
        for path in candidates:
            key = path.resolve()
            if key in seen or key in listed or not path.exists():
                continue
            seen.add(key)
            if manifest.lookup(path) is None:
                unlisted.append(str(path))
        if unlisted:
            problems.append(f"not listed in the manifest (add rows, or --allow-unlisted): {', '.join(unlisted)}")
    missing_constants, car_without = [], {"study_day": [], "subject_id": []}
    overrides = {name: _has_override(options, name) for name in POSITIVE_COLUMNS}
    method_override = getattr(options, "method", None) if options is not None else None
    for row in manifest.rows:
        label = _label(row)
        numbers = {}
        for column in ("study_day", *POSITIVE_COLUMNS, "lymphocytes_cv"):
            try:
                numbers[column] = row.number(column)
            except ValueError:
                problems.append(f"{label}: {column} is not a number: {row.text(column)!r}")
                numbers[column] = None
                continue
            value = numbers[column]
            if value is None:
                continue
            if value != value or value in (float("inf"), float("-inf")):
                problems.append(f"{label}: {column} is not a finite number: {row.text(column)!r}")
                numbers[column] = None
            elif column in POSITIVE_COLUMNS and value <= 0:
                problems.append(f"{label}: {column} must be > 0 (got {row.text(column)})")
            elif column == "lymphocytes_cv" and not 0 <= value < 1:
                problems.append(f"{label}: lymphocytes_cv must be a fraction in [0, 1) such as 0.05 "
                                f"(got {row.text(column)})")
        method = row.text("counting_method").lower()
        if method and method not in COUNTING_METHODS:
            problems.append(f"{label}: counting_method {row.text('counting_method')!r} is not one of "
                            f"{', '.join(COUNTING_METHODS)}")
        method = method_override or method or "auto"
        has = {name: overrides[name] or row.text(name) != "" for name in POSITIVE_COLUMNS}
        other_method = (method in ("auto", "volumetric") and has["dilution_factor"]) or \
            (method in ("auto", "dual-platform") and has["lymphocytes_per_ul"])
        if method in ("auto", "beads") and not (has["beads_per_test"] and has["sample_volume_ul"]) \
                and not other_method:
            absent = [n for n in ("beads_per_test", "sample_volume_ul") if not has[n]]
            missing_constants.append(f"{row.line} ({'/'.join(absent)})")
        if "car" in row.text("tube").lower():
            for column in ("study_day", "subject_id"):
                if not row.text(column):
                    car_without[column].append(str(row.line))
    for column, lines in car_without.items():
        if lines:
            problems.append(f"CAR tubes without a {column} (their pre-infusion reference cannot be linked) on rows "
                            + ", ".join(lines))
    if missing_constants:
        problems.append("no bead constants (beads_per_test and sample_volume_ul, or --beads-per-test/"
                        "--sample-volume-ul, or another counting method's inputs) on rows "
                        + ", ".join(missing_constants))
    return problems


def check_manifest(manifest, files=(), folders=(), options=None, allow_unlisted=False):
    """Raise one :class:`ManifestError` listing every problem :func:`validate_manifest` finds.

    The message's first line names the manifest and the number of problems;
    then one line per problem.

    Examples
    --------
    >>> m = read_manifest("sample_fcs/manifest.csv")
    >>> check_manifest(m, m.files()) is None
    True
    """
    problems = validate_manifest(manifest, files, folders, options, allow_unlisted)
    if problems:
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise ManifestError(f"{manifest.path}: {count}, nothing analysed:\n  " + "\n  ".join(problems))
    logger.info("%s: %d rows checked", manifest.path, len(manifest.rows))
