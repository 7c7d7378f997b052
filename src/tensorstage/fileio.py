"""Small file helpers every writer and reader shares.

Why one place: the project's rules are "never leave a partial or corrupt output" (write to a temp
file in the same folder, then rename) and "an unreadable input is a one-line error naming the
file" (``SpecError``); each writer re-implementing them drifts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tensorstage.errors import SpecError


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file beside it, then ``os.replace``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file beside it, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shareable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text input; a missing or unreadable file is a :class:`SpecError` naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(str(p), "not a UTF-8 text file") from None


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


@contextmanager
def atomic_dir(out: str | os.PathLike[str], field: str = "out") -> Iterator[Path]:
    """Yield a fresh sibling temp directory; when the block succeeds it replaces ``out`` in one
    rename (else it is removed), so readers never see a half-written output directory.
    ``out`` must be absent, empty or an earlier tensorstage output (:func:`require_replaceable_dir`)."""
    out = Path(out)
    require_replaceable_dir(out, field)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
