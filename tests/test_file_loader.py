"""Every user file goes through one reader: the same one-line errors for binary, huge, missing
and malformed files, whichever option named them; click usage errors are one line too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorstage.errors import SpecError
from tensorstage.fileio import read_json_file, read_text_file, read_yaml_file
from tests.support import run_main

BINARY = b"\xff\xfe\x00\x01 not text"


@pytest.fixture()
def binary(tmp_path: Path) -> Path:
    f = tmp_path / "binary.yaml"
    f.write_bytes(BINARY)
    return f


def test_reader_errors_name_the_file(tmp_path: Path, binary: Path) -> None:
    with pytest.raises(SpecError, match="not a UTF-8 text file") as err:
        read_text_file(binary)
    assert err.value.field == str(binary)
    with pytest.raises(SpecError, match="cannot read plan file: No such file") as err:
        read_text_file(tmp_path / "nope.yaml", "plan file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(SpecError, match="invalid YAML") as err:
        read_yaml_file(bad)
    assert err.value.field.startswith(f"{bad}:")  # with the line number
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  "a": 1,\n}\n')
    with pytest.raises(SpecError, match="invalid JSON at column") as err:
        read_json_file(bad_json)
    assert err.value.field == f"{bad_json}:3"
    obj = tmp_path / "obj.yaml"
    obj.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        read_yaml_file(obj)


@pytest.mark.parametrize("option", [
    ["simulate", "llama3.1-8b", "--system", "dgx-h100-superpod", "-c"],
    ["simulate", "llama3.1-8b", "--system"],
    ["validate", "--cases"],
    ["hardware"],
    ["show"],
    ["run", "--out", "never", "-c"],
])
def test_a_binary_file_is_one_line_for_every_option(option: list[str], binary: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    res = run_main(monkeypatch, capsys, *option, str(binary))
    assert res.returncode == 2
    assert res.stderr == f"error: {binary}: not a UTF-8 text file\n"
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, expect", [
    (["simulate", "llama3.1-8b", "--system", "dgx-h100-superpod", "--tp", "1.5"], "--tp"),
    (["simulate", "llama3.1-8b", "--system", "dgx-h100-superpod", "--tp", "abc"], "--tp"),
    (["simulat", "llama3.1-8b"], "Did you mean 'simulate'"),
    (["models", "foo"], "unexpected extra argument"),
    (["run", "--workers", "-1", "--out", "r_w"], "--workers"),
    (["show"], "Missing argument"),
])
def test_usage_errors_are_one_line(args: list[str], expect: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, *args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: tensorstage"), res.stderr
    assert expect in res.stderr and "╭" not in res.stderr


@pytest.mark.parametrize("cmd", [
    ["generate", "gpt3-125m", "--tp", "1", "--pp", "1", "--dp", "1", "--seq", "128", "--out"],
    ["simulate", "gpt3-125m", "--tp", "1", "--pp", "1", "--dp", "1", "--seq", "128", "--system", "dgx-a100-selene",
     "--report"],
    ["simulate", "gpt3-125m", "--tp", "1", "--pp", "1", "--dp", "1", "--seq", "128", "--system", "dgx-a100-selene",
     "--timeline"],
])
def test_unwritable_outputs_name_the_option_and_the_users_path(cmd: list[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile.txt"
    blocker.write_text("mine")
    target = blocker / "sub"
    res = run_main(monkeypatch, capsys, *cmd, str(target))
    option = cmd[-1].removeprefix("--")
    assert res.returncode == 2
    assert res.stderr == f"error: {option}: cannot write {target}: a folder on its path is a file\n"
    assert ".tmp" not in res.stderr and blocker.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_disk_full_names_the_option_and_the_users_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import tensorstage.trace.writer as writer

    def full(path: str, data: bytes) -> None:  # what os.write raises on a full disk: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_write_file", full)
    out = tmp_path / "traces"
    res = run_main(monkeypatch, capsys, "generate", "gpt3-125m", "--tp", "1", "--pp", "1", "--dp", "1", "--seq", "128",
                   "--workers", "1", "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1] == f"error: out: cannot write {out}: No space left on device"
    assert ".tmp" not in res.stderr and list(tmp_path.iterdir()) == []
