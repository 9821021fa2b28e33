"""``python -m bench perf-owners`` (bench/perf_owners.py) on ``perf script`` text in the shape perf writes: each
sample charged to its innermost compiled function (with the CPython API beneath it), interpreted code to the
compiled function that entered it, ``--within`` keeping one path's samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import perf_owners

# Five samples, innermost frame first, separated by blank lines, as `perf script -F ip,sym` prints them.
SCRIPT = """\
\t    7f00 _Py_dict_lookup
\t    7f01 PyDict_GetItemWithError
\t    7f02 CPyDef_index___SubstationIndex___refile
\t    7f03 CPyDef_service___BalancerService___handle
\t    7f04 _PyEval_EvalFrameDefault

\t    7f10 _PyEval_EvalFrameDefault
\t    7f11 _PyObject_VectorcallTstate (inlined)
\t    7f12 CPyDef_ends___SessionEnds___update
\t    7f13 CPyDef_service___BalancerService___handle

\t    7f20 json_decode_struct_map_inner
\t    7f21 json_decode.part.0
\t    7f22 CPyDef_codec___decode
\t    7f23 CPyDef_service___BalancerService___handle

\t    7f30 sock_recv
\t    7f31 _PyEval_EvalFrameDefault
\t    7f32 _PyEval_EvalFrameDefault

\t    7f40 CPyArg_ParseStackAndKeywordsOneArg
\t    7f41 CPyPy_service___BalancerService___handle
\t    7f42 _PyEval_EvalFrameDefault
"""


def test_each_sample_is_charged_to_its_innermost_compiled_function_or_msgspec_entry() -> None:
    samples = list(perf_owners.stacks(SCRIPT.splitlines()))
    assert len(samples) == 5
    assert samples[1][1] == "_PyObject_VectorcallTstate"  # ("(inlined)" dropped)
    assert [perf_owners.owner(s) for s in samples] == [
        ("CPyDef_index___SubstationIndex___refile", None),
        (perf_owners.INTERPRETED, "CPyDef_ends___SessionEnds___update"),
        ("json_decode.part.0", None),  # (a compiler's clone of msgspec's json_decode)
        (perf_owners.INTERPRETED, None),
        ("CPyPy_service___BalancerService___handle", None),  # (the wrapper parsing a call from Python)
    ]


def test_the_report_counts_owners_callers_and_inclusive_shares_within_a_path() -> None:
    within = perf_owners.report(perf_owners.stacks(SCRIPT.splitlines()), within="BalancerService___handle")
    assert within == """\
5 samples, 4 within BalancerService___handle (= 100 %)
owner (the innermost compiled function, with the CPython API it calls):
      1  25.0 %  CPyDef_index___SubstationIndex___refile
      1  25.0 %  (interpreted)
      1  25.0 %  json_decode.part.0
      1  25.0 %  CPyPy_service___BalancerService___handle
interpreted code, by the compiled function that called it:
      1  25.0 %  CPyDef_ends___SessionEnds___update
compiled functions, inclusive:
      3  75.0 %  CPyDef_service___BalancerService___handle
      1  25.0 %  CPyDef_index___SubstationIndex___refile
      1  25.0 %  CPyDef_ends___SessionEnds___update
      1  25.0 %  CPyDef_codec___decode"""
    everything = perf_owners.report(perf_owners.stacks(SCRIPT.splitlines()), top=1)
    assert everything == """\
5 samples, 5 (= 100 %)
owner (the innermost compiled function, with the CPython API it calls):
      2  40.0 %  (interpreted)
interpreted code, by the compiled function that called it:
      1  20.0 %  CPyDef_ends___SessionEnds___update
compiled functions, inclusive:
      3  60.0 %  CPyDef_service___BalancerService___handle"""
    assert perf_owners.report([], within="x") == "0 samples, none within x"


def test_the_command_reads_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "perf.txt"
    script.write_text(SCRIPT, encoding="utf-8")
    assert perf_owners.main([str(script), "--within", "SessionEnds", "--top", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "5 samples, 1 within SessionEnds (= 100 %)",
        "owner (the innermost compiled function, with the CPython API it calls):",
        "      1 100.0 %  (interpreted)",
        "interpreted code, by the compiled function that called it:",
        "      1 100.0 %  CPyDef_ends___SessionEnds___update",
        "compiled functions, inclusive:",
        "      1 100.0 %  CPyDef_ends___SessionEnds___update",  # (ties: innermost first)
        "      1 100.0 %  CPyDef_service___BalancerService___handle",
    ]
