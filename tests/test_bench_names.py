"""A bench script runs with bench/ first on sys.path, so one named like a standard-library module
(inspect.py, as a first draft of bench/inspect_prompt.py was) is what every later `import inspect`
gets, numpy's included: the script dies before its first line of work."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_no_bench_script_shadows_a_standard_module():
    names = {p.stem for p in BENCH.glob("*.py")}
    assert names, "no bench scripts found"
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))
