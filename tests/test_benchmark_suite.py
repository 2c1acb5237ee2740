"""`python -m benchmarks --device cpu --quick` (kd-bench): the structure of its output, not
its speed: every op, every available competitor (or its reason for being skipped), every case
and mode, positive times, and the plots."""

import json

import pytest

from benchmarks import suite


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    suite.main(["--device", "cpu", "--quick", "--repeats", "2", "--out", str(folder)])
    with open(folder / "suite_quick.json") as results:
        return json.load(results), (folder / "suite_quick.md").read_text(), folder


def test_every_op_case_mode_and_competitor_is_measured(quick_run):
    payload, _, _ = quick_run
    rows = payload["results"]
    assert {row["op"] for row in rows} == set(suite.OPS)
    for op_suite in suite.load_suites(list(suite.OPS)):
        impls, skipped = op_suite.implementations("cpu", True)
        assert payload["skipped"][op_suite.op] == skipped
        assert all(isinstance(reason, str) and reason for reason in skipped.values())
        assert any(name.startswith("kd_kernels[") for name in impls)
        cases = op_suite.cases("cpu", True)
        for label, size, _ in cases:
            for mode in suite.MODES:
                names = {
                    row["name"]
                    for row in rows
                    if (row["op"], row["case"], row["mode"]) == (op_suite.op, label, mode)
                }
                expected = {
                    name for name, fn in impls.items() if size <= getattr(fn, "max_x", size)
                }
                assert names == expected, (op_suite.op, label, mode)


def test_numbers_are_positive_and_machine_is_recorded(quick_run):
    payload, _, _ = quick_run
    for row in payload["results"]:
        assert not row.get("out_of_memory")
        assert row["median_ms"] > 0 and row["iqr_ms"] >= 0 and row["peak_extra_mib"] >= 0
        assert row["repeats"] == 2 and row["x"] > 0
    assert payload["machine"]["torch"] and payload["memory_method"]


def test_markdown_has_a_table_per_case_and_the_skip_reasons(quick_run):
    payload, table, _ = quick_run
    cases = {(row["op"], row["mode"], row["case"]) for row in payload["results"]}
    for op, mode, case in cases:
        assert f"### {op}, {mode}, {case}" in table
    assert "skipped:" in table


def test_plots_are_written(quick_run):
    payload, _, folder = quick_run
    paths = suite.plots(payload, str(folder))
    assert len(paths) == len(suite.MODES)  # one figure per mode, a row per op
    for path in paths:
        with open(path, "rb") as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gpu_suite_summarises_test_logs_per_file(tmp_path):
    """The GPU suite's per-file counts, from a verbose log cut short (a killed stage) and from
    a --collect-only log (the dry run)."""
    from benchmarks import gpu_suite

    run_log = tmp_path / "run.log"
    run_log.write_text(
        "tests/test_a_cuda.py::test_x[(2, 9)-triton] PASSED                [ 1%]\n"
        "tests/test_a_cuda.py::test_x[(3, 9)-triton] FAILED                [ 2%]\n"
        "tests/test_b_cuda.py::test_y[cuda] PASSED                         [ 3%]\n"
        "tests/test_b_cuda.py::test_z[cuda] "  # killed mid-line
    )
    assert gpu_suite.per_file_counts(run_log) == {
        "tests/test_a_cuda.py": {"PASSED": 1, "FAILED": 1},
        "tests/test_b_cuda.py": {"PASSED": 1},
    }
    assert gpu_suite.failed_tests(run_log) == ["tests/test_a_cuda.py::test_x[(3, 9)-triton]"]
    collect_log = tmp_path / "collect.log"
    collect_log.write_text(
        "<Dir tests>\n  <Module test_a_cuda.py>\n    docstring\n"
        "    <Function test_x[(2, 9)-triton]>\n    <Function test_x[(3, 9)-triton]>\n"
        "  <Module test_b_cuda.py>\n    <Function test_y[cuda]>\n"
    )
    assert gpu_suite.per_file_counts(collect_log) == {
        "test_a_cuda.py": {"collected": 2},
        "test_b_cuda.py": {"collected": 1},
    }
