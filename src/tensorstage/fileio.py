"""Small file helpers every writer and reader shares.

Why one place: the project's rules are "never leave a partial or corrupt output" (write to a temp
file in the same folder, then rename) and "an unreadable input is a one-line error naming the
file" (``SpecError``); each writer re-implementing them drifts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tensorstage.errors import SpecError


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file beside it, then ``os.replace``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file beside it, then ``os.replace``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:  # name the user's path, never the hidden temp file
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shareable files
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: The largest user text file read (plan, system, cases, model): far above any real one, and a
#: guard against ``-c /dev/zero`` or a multi-GB file read into memory.
MAX_TEXT_FILE_BYTES = 64 * 2**20


def read_text_file(path: str | os.PathLike[str], what: str = "file") -> str:
    """Read a UTF-8 text input: the one reader of every user file (plan ``-c``, ``--system``,
    ``--cases``, model files), so each problem is the same one-line :class:`SpecError` naming the
    user's path: ``FILE: cannot read <what>: <reason>``, ``FILE: not a UTF-8 text file``."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(str(p), f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise SpecError(str(p), f"larger than {MAX_TEXT_FILE_BYTES // 2**20} MiB; not a {what} tensorstage reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(str(p), "not a UTF-8 text file") from None


def parse_yaml_text(text: str, path: str | os.PathLike[str]) -> Any:
    """``yaml.safe_load`` (no Python objects) with errors as ``FILE:LINE: invalid YAML: problem``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{line}", f"invalid YAML: {problem}") from None


def read_yaml_file(path: str | os.PathLike[str], what: str = "file") -> Any:
    """A user YAML file through :func:`read_text_file` and :func:`parse_yaml_text`."""
    return parse_yaml_text(read_text_file(path, what), path)


def read_json_file(path: str | os.PathLike[str], what: str = "file") -> Any:
    """A user JSON file; a syntax error is ``FILE:LINE: invalid JSON at column C: problem``."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}", f"invalid JSON at column {exc.colno}: {exc.msg}") from None


#: File sets by which an existing directory is recognised as an earlier tensorstage output
#: (``run`` result, ``--report`` folder) and so may be replaced wholesale; a trace folder is
#: recognised by its manifest's ``"tool": "tensorstage"``.
OUTPUT_MARKERS = (("result.json", "report.md"), ("report.md", "report.html"))


def _is_our_output(p: Path) -> bool:
    if any(all((p / f).is_file() for f in files) for files in OUTPUT_MARKERS):
        return True
    try:
        return json.loads((p / "manifest.json").read_text(encoding="utf-8")).get("tool") == "tensorstage"
    except (OSError, ValueError, AttributeError):
        return False


def require_replaceable_dir(path: str | os.PathLike[str], field: str = "out") -> None:
    """Refuse to replace ``path`` unless it is absent, empty or an earlier tensorstage output.

    Why: output directories are replaced atomically (the old one is deleted), so a mistyped
    ``--out ~/project`` would otherwise silently delete the user's files.
    """
    p = Path(path)
    if not p.exists():
        return
    if not p.is_dir():
        raise SpecError(field, f"{p} exists and is not a directory")
    if any(p.iterdir()) and not _is_our_output(p):
        raise SpecError(field, f"{p} is a non-empty directory that is not a tensorstage output "
                        "(it would be replaced); give a new or empty directory")


def os_reason(exc: OSError) -> str:
    """Why a write failed, in the user's words (mkdir under a file is EEXIST/ENOTDIR)."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir under a file: say which way it is wrong
        return "a folder on its path is a file"
    return exc.strerror or str(exc)


def require_replaceable_file(path: str | os.PathLike[str], field: str, prefix: bytes, force: bool = False) -> None:
    """Refuse to overwrite ``path`` unless it is absent, starts with ``prefix`` (our own earlier
    output) or ``force``: a mistyped ``--timeline notes.json`` must not destroy the user's file."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(field, f"{p} is a directory; give a file path (e.g. step.json)")
    if not p.exists() or force:
        return
    try:
        with open(p, "rb") as fh:
            head = fh.read(len(prefix))
    except OSError as exc:
        raise SpecError(field, f"cannot read {p}: {exc.strerror or exc}") from None
    if head != prefix:
        raise SpecError(field, f"{p} exists and is not a tensorstage output; give another path or --force "
                        "to overwrite it")


def require_writable_dir(path: str | os.PathLike[str], field: str = "out") -> None:
    """Fail before the work when ``path`` cannot be created: a folder on its path is a file, or
    the nearest existing folder is not writable (the write itself still reports anything else)."""
    p = Path(path)
    probe = p.parent if p.parent != p else p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SpecError(field, f"cannot write {p}: a folder on its path is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpecError(field, f"cannot write {p}: Permission denied")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is someone else's
        return True
    return True


def remove_stale_temps(out: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders beside ``out`` whose process is
    gone (killed, or a second Ctrl-C): they are ours, hidden, and can hold gigabytes. A live
    process's temp folder (a concurrent writer) is left alone. Returns what was removed."""
    out = Path(out)
    removed = []
    try:
        siblings = list(out.parent.glob(f".{out.name}.*-*"))
    except OSError:
        return removed
    for p in siblings:
        tag, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if tag in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(out: str | os.PathLike[str], field: str = "out") -> Iterator[Path]:
    """Yield a fresh sibling temp directory; when the block succeeds it replaces ``out`` in one
    rename (else it is removed), so readers never see a half-written output directory.
    ``out`` must be absent, empty or an earlier tensorstage output (:func:`require_replaceable_dir`)."""
    out = Path(out)
    require_replaceable_dir(out, field)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    remove_stale_temps(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:  # name the option and the user's path, never the hidden temp folder
        raise SpecError(field, f"cannot write {out}: {os_reason(exc)}") from None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.filename is None or str(exc.filename).startswith((str(tmp), str(out))):
            # still an OSError (callers may retry), but naming the option and the user's path
            raise OSError(exc.errno, f"{field}: cannot write {out}: {os_reason(exc)}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
