"""The error family: what the CLI turns into one line and an exit code."""

from __future__ import annotations

import pytest
from medxfer.core.errors import DataError, MedxferError, StageError


def test_data_error_is_user_facing_and_still_a_value_error() -> None:
    assert issubclass(DataError, MedxferError) and issubclass(DataError, ValueError)
    assert DataError.exit_code == StageError.exit_code == 1 and MedxferError.exit_code == 2
    with pytest.raises(ValueError):
        raise DataError("x")
