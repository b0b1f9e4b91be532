"""The multi-appliance failure: one error type carrying each appliance's result."""

from __future__ import annotations

import pytest

from hsmctl.errors import HsmctlError, PartialFailure, most_severe

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("results", "code"),
    [
        ({"a": 0, "b": 5, "c": 1}, 1),
        ({"a": 4, "b": 3}, 3),
        ({"a": 5, "b": 0}, 5),
        ({"a": 4, "b": 1, "c": 5}, 4),
    ],
)
def test_exits_with_the_most_severe_result(results: dict[str, int], code: int) -> None:
    err = PartialFailure("some failed", results=results, detail={"appliances": []})
    assert isinstance(err, HsmctlError)
    assert err.exit_code == code == most_severe(results.values())
    assert err.results == results and err.detail == {"appliances": []}
    assert HsmctlError.exit_code == 1  # the class default is untouched


def test_the_json_error_report_cannot_fail_or_lie(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from pathlib import Path

    from hsmctl.cli.main import _fail

    _fail(["x", "--json"], 3, "bad", {"exit_code": 0, "message": "fine", "path": Path("/p")})
    out = json.loads(capsys.readouterr().out)
    assert out == {"error": {"exit_code": 3, "message": "bad", "path": "/p"}}
