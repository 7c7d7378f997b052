"""The test helpers' one way to the shared reference data: found beside the repository, loud when absent."""

from __future__ import annotations

import pytest

from tests.support import PUBLIC_CASES, REPO_ROOT, SHARED_DIR, public_cases, shared_file


def test_shared_data_sits_beside_the_repository() -> None:
    assert (REPO_ROOT / "pyproject.toml").is_file()
    assert shared_file(PUBLIC_CASES) == SHARED_DIR / "validation" / "public_cases.yaml"
    assert {"cases", "formulas", "hardware_reference"} <= set(public_cases())


def test_a_missing_shared_file_fails_naming_the_path() -> None:
    with pytest.raises(FileNotFoundError) as exc:
        shared_file("validation/no_such_file.yaml")
    assert str(SHARED_DIR / "validation" / "no_such_file.yaml") in str(exc.value)
    assert "../shared/validation/no_such_file.yaml" in str(exc.value)


def test_public_cases_returns_a_fresh_copy() -> None:
    first = public_cases()
    first["cases"].clear()
    assert public_cases()["cases"]
