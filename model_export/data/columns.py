"""Reading a generic-format log file and checking its columns, before any semantics.

Every check is vectorised and, on failure, names the column and the first offending
1-based data row (the header is not counted), so a user can fix their export. The
checks run on the whole table before anything is built: a file either loads whole or
not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

REQUIRED: Final = ("user_id", "item_id", "category", "ts", "label", "request_id")
OPTIONAL: Final = ("action", "split")
SPLITS: Final = ("train", "valid", "test")
STRING_COLUMNS: Final = ("user_id", "request_id", "split")
_MAX_EXACT_FLOAT: Final = 2.0**53  # integral floats above this may have lost digits


class LogFormatError(ValueError):
    """The file is not a valid generic-format log; the message names column and row."""


def read_table(path: Path) -> pd.DataFrame:
    """Read .csv or .parquet as a DataFrame, keeping string ids as strings.

    CSV: only an empty field is missing (a user called "NA" stays "NA").
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"log file not found: {path}")
    if suffix == ".csv":
        try:
            df = pd.read_csv(
                path,
                dtype={c: "string" for c in STRING_COLUMNS},
                na_values=[""],
                keep_default_na=False,
                low_memory=False,
            )
        except pd.errors.EmptyDataError as e:
            raise LogFormatError(f"{path.name}: empty file (no header, no rows)") from e
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise LogFormatError(f"{path.name}: not a readable CSV: {e}") from e
    elif suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise LogFormatError(f"{path.name}: not a readable Parquet file: {e}") from e
    else:
        raise LogFormatError(f"{path.name}: unknown extension {suffix!r} (use .csv or .parquet)")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise LogFormatError(
            f"{path.name}: missing column(s) {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
        )
    if len(df) == 0:
        raise LogFormatError(f"{path.name}: empty file (header only, no data rows)")
    return df.reset_index(drop=True)


def _fail(name: str, column: str, row0: int, what: str) -> LogFormatError:
    return LogFormatError(f"{name}: column {column!r}, row {row0 + 1}: {what}")


def int_column(df: pd.DataFrame, column: str, name: str, *, minimum: int = 0) -> np.ndarray:
    """A column as int64, refusing missing, non-integer, out-of-range or negative values."""
    s = df[column]
    if pd.api.types.is_bool_dtype(s) and not s.hasnans:
        return s.to_numpy(dtype=np.int64)
    if not (pd.api.types.is_integer_dtype(s) or pd.api.types.is_float_dtype(s)):
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna().to_numpy()
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise _fail(name, column, r, f"{s.iloc[r]!r} is not an integer")
        s = num
    if s.hasnans:
        r = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise _fail(name, column, r, "missing value")
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v) | (v != np.floor(v)) | (np.abs(v) >= _MAX_EXACT_FLOAT)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise _fail(name, column, r, f"{v[r]!r} is not an integer")
        out = v.astype(np.int64)
    elif pd.api.types.is_unsigned_integer_dtype(s):
        u = s.to_numpy(dtype=np.uint64)
        bad = u > np.uint64(np.iinfo(np.int64).max)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise _fail(name, column, r, f"{u[r]} is out of range (must be < 2^63)")
        out = u.astype(np.int64)
    else:
        out = s.to_numpy(dtype=np.int64)
    low = out < minimum
    if low.any():
        r = int(np.flatnonzero(low)[0])
        raise _fail(name, column, r, f"{out[r]} is negative (must be >= {minimum})")
    return out


def string_column(
    df: pd.DataFrame, column: str, name: str, *, allow_empty: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A text column as (codes int64 (n,), values object (K,) sorted); code -1 = empty.

    Empty means missing or "". Integer ids (a Parquet int column) are accepted and read
    as their decimal text; anything else that is not text (floats, bytes, lists) is a
    wrong type. Codes, not per-row Python strings: millions of rows stay cheap.
    """
    s = df[column]
    if isinstance(s.dtype, pd.CategoricalDtype):  # Parquet dictionary columns
        s = s.astype(object)
    if not (pd.api.types.is_integer_dtype(s) and not s.hasnans):
        missing = s.isna().to_numpy()
        kind = "empty" if missing.all() else pd.api.types.infer_dtype(s, skipna=True)
        if kind not in ("string", "empty", "integer"):
            ok = missing | s.map(lambda x: isinstance(x, str)).to_numpy(dtype=bool)
            r = int(np.flatnonzero(~ok)[0]) if (~ok).any() else 0
            raise _fail(name, column, r, f"{s.iloc[r]!r} is not a string ({kind} column)")
    codes, uniques = pd.factorize(s)  # missing -> -1
    values = np.asarray([str(v) for v in uniques], dtype=object)
    order = np.argsort(values, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    codes = np.asarray(codes, dtype=np.int64)
    if rank.size:
        codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
    values = values[order]
    if values.size and values[0] == "":  # "" sorts first: fold it into "empty"
        codes = np.maximum(codes - 1, -1)
        values = values[1:]
    if not allow_empty and (codes < 0).any():
        r = int(np.flatnonzero(codes < 0)[0])
        raise _fail(name, column, r, "missing value")
    return codes, values
