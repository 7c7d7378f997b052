"""Request traces in the public formats users have, read into a :class:`RequestTable`.

* **Azure LLM inference traces** (Azure/AzurePublicDataset, ``AzureLLMInferenceTrace_*.csv``):
  columns ``TIMESTAMP`` (a date-time such as ``2023-11-16 18:15:46.6805900``, or seconds),
  ``ContextTokens``, ``GeneratedTokens`` (rows with 0 generated tokens produced nothing and are skipped).
* **Mooncake** (kvcache-ai/Mooncake traces, JSONL): ``timestamp`` (milliseconds), ``input_length``,
  ``output_length``, optional ``hash_ids`` (chain hashes of 512-token prompt blocks). A request
  whose leading blocks were seen in an earlier request gets a shared prefix of those blocks
  (``prefix_id`` = the last shared block's hash), so a prefix cache can hit.
* **BurstGPT** (HPMLL/BurstGPT, CSV): ``Timestamp`` (seconds), ``Request tokens``,
  ``Response tokens``; rows with 0 response tokens are failed requests in that dataset and are
  skipped.

**Length files** (:func:`load_lengths`): a CSV of ``input_length,output_length`` rows, one per
dataset sample (e.g. the MLPerf Llama-2-70B dataset's token counts), for workloads whose arrivals
come from an arrival process rather than from the file.

Times are shifted so the first request arrives at 0 and must not decrease. Any bad row is a
one-line :class:`SpecError` naming the file, the row (1-based, header = row 1 for CSV) and the field.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tensorstage.errors import SpecError
from tensorstage.fileio import os_reason
from tensorstage.serve.entities import RequestTable

FORMATS = ("azure", "mooncake", "burstgpt")
MOONCAKE_BLOCK_TOKENS = 512
#: the most tokens one request may hold (input or output): far beyond any model's context (2**31),
#: and well inside int64 for the request table's sums
MAX_TOKENS = 2**31
_AZURE = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURST = ("Timestamp", "Request tokens", "Response tokens")


def _int(text: object, where: str, field: str, minimum: int) -> int:
    if text is None or str(text).strip() == "":
        raise SpecError(f"{where}.{field}", "missing value")
    try:
        val = float(str(text).strip())
    except ValueError:
        raise SpecError(f"{where}.{field}", f"not a number: {text!r}") from None
    if not np.isfinite(val) or val != int(val) or val < minimum:
        raise SpecError(f"{where}.{field}", f"must be an integer >= {minimum}, got {text!r}")
    if val > MAX_TOKENS:
        raise SpecError(f"{where}.{field}", f"must be at most {MAX_TOKENS:,} tokens, got {text!r}")
    return int(val)


def _time(text: object, where: str, field: str) -> float:
    s = str(text).strip()
    try:
        return float(s)
    except ValueError:
        pass
    try:  # Azure: up to 7 fractional digits; datetime takes 6
        head, _, frac = s.partition(".")
        base = datetime.fromisoformat(head).replace(tzinfo=UTC)
        return base.timestamp() + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise SpecError(f"{where}.{field}", f"not a time (seconds or date-time): {text!r}") from None


def _table(times: list[float], isl: list[int], osl: list[int], where: list[str], field: str,
           pid: list[int] | None = None, ptk: list[int] | None = None) -> RequestTable:
    if not times:
        raise SpecError("trace", "no requests in the file")
    t = np.asarray(times, dtype=np.float64)
    back = np.flatnonzero(np.diff(t) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise SpecError(f"{where[i]}.{field}", f"earlier than the previous row ({times[i]} < {times[i - 1]}); "
                        "sort the trace by time")
    return RequestTable.of(t - t[0], isl, osl, pid, ptk)


def _csv(path: Path, columns: tuple[str, ...], skip_zero_output: bool = True) -> RequestTable:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise SpecError("trace", f"{path.name}: empty file")
        missing = [c for c in columns if c not in header]
        if missing:
            raise SpecError("trace", f"{path.name}: missing column {missing[0]!r} (need {', '.join(columns)})")
        reader.fieldnames = header
        times, isl, osl, where = [], [], [], []
        for n, row in enumerate(reader, start=2):
            at = f"{path.name} row {n}"
            if any(row.get(c) in (None, "") for c in columns):
                c = next(c for c in columns if row.get(c) in (None, ""))
                raise SpecError(f"{at}.{c}", "missing value")
            out = _int(row[columns[2]], at, columns[2], 0)
            if out == 0 and skip_zero_output:
                continue
            times.append(_time(row[columns[0]], at, columns[0]))
            isl.append(_int(row[columns[1]], at, columns[1], 1))
            osl.append(out)
            where.append(at)
    return _table(times, isl, osl, where, columns[0])


def _mooncake(path: Path) -> RequestTable:
    times, isl, osl, where, pid, ptk = [], [], [], [], [], []
    seen: set[int] = set()
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            at = f"{path.name} row {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(at, f"not a JSON object: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise SpecError(at, "not a JSON object")
            for field in ("timestamp", "input_length", "output_length"):
                if field not in rec:
                    raise SpecError(f"{at}.{field}", "missing field")
            times.append(_time(rec["timestamp"], at, "timestamp") / 1e3)
            inp = _int(rec["input_length"], at, "input_length", 1)
            isl.append(inp)
            osl.append(_int(rec["output_length"], at, "output_length", 1))
            where.append(at)
            hashes = rec.get("hash_ids") or []
            if not isinstance(hashes, list):
                raise SpecError(f"{at}.hash_ids", "must be a list of integers")
            shared = 0
            for h in hashes:
                if h not in seen:
                    break
                shared += 1
            pid.append(int(hashes[shared - 1]) if shared else -1)
            ptk.append(min(shared * MOONCAKE_BLOCK_TOKENS, inp - 1))
            seen.update(int(h) for h in hashes)
    return _table(times, isl, osl, where, "timestamp", pid, ptk)


def load_trace(path: str | Path, fmt: str | None = None) -> RequestTable:
    """Requests of a trace file; ``fmt`` one of :data:`FORMATS` (default: from the extension and header)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("trace", f"file not found: {p}")
    if p.stat().st_size == 0:
        raise SpecError("trace", f"{p.name}: empty file")
    if fmt is not None and fmt not in FORMATS:
        raise SpecError("--trace-format", f"unknown trace format {fmt!r}", FORMATS)
    try:  # streamed (traces can be large), so decoding problems surface here, as one line
        if fmt is None:
            if p.suffix.lower() in (".jsonl", ".json"):
                fmt = "mooncake"
            else:
                with p.open(encoding="utf-8") as fh:
                    head = fh.readline()
                fmt = "burstgpt" if "Request tokens" in head else "azure"
        if fmt == "mooncake":
            return _mooncake(p)
        if fmt == "burstgpt":
            return _csv(p, _BURST, skip_zero_output=True)
        return _csv(p, _AZURE, skip_zero_output=True)
    except UnicodeDecodeError:
        raise SpecError(str(p), "not a UTF-8 text file") from None
    except OSError as exc:
        raise SpecError(str(p), f"cannot read trace file: {os_reason(exc)}") from None


LENGTH_COLUMNS = ("input_length", "output_length")


def load_lengths(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens, output tokens) per row of a length file (module docstring); each >= 1.

    Rows, not a fitted distribution, so a workload drawn from the file keeps the dataset's
    joint input/output shape (long prompts with short answers and the reverse)."""
    p = Path(path)
    if p.is_dir():
        raise SpecError("lengths", f"{p} is a directory; give a CSV file")
    if not p.is_file():
        raise SpecError("lengths", f"file not found: {p}")
    if p.stat().st_size == 0:
        raise SpecError("lengths", f"{p.name}: empty file")
    isl: list[int] = []
    osl: list[int] = []
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in LENGTH_COLUMNS if c not in header]
            if missing:
                raise SpecError("lengths", f"{p.name}: missing column {missing[0]!r} "
                                f"(need {', '.join(LENGTH_COLUMNS)})")
            reader.fieldnames = header
            for n, row in enumerate(reader, start=2):
                at = f"{p.name} row {n}"
                isl.append(_int(row.get("input_length"), at, "input_length", 1))
                osl.append(_int(row.get("output_length"), at, "output_length", 1))
    except UnicodeDecodeError:
        raise SpecError(str(p), "not a UTF-8 text file") from None
    except OSError as exc:
        raise SpecError(str(p), f"cannot read length file: {os_reason(exc)}") from None
    if not isl:
        raise SpecError("lengths", f"{p.name}: no rows")
    return np.asarray(isl, dtype=np.int64), np.asarray(osl, dtype=np.int64)


__all__ = ["FORMATS", "LENGTH_COLUMNS", "load_lengths", "load_trace"]
