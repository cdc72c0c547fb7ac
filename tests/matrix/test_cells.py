"""One test per matrix cell (see testbench/pytest_plugin.py and images/matrix-ci.toml)."""


def test_cell(tb_cell, tb_result):
    assert tb_result["verdict"] != "error", tb_result["reasons"]
    if tb_cell.expect is not None:
        assert tb_result["verdict"] == tb_cell.expect, tb_result["reasons"]
    # The oracle judged the very addresses kexec chose: a passing run must be safe, a failing one a collision.
    predicted = (tb_result.get("predicted") or {}).get("verdict")
    assert predicted == {"pass": "safe", "fail": "collision"}[tb_result["verdict"]], (predicted, tb_result["reasons"])
