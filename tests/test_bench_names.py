"""A bench script runs with bench/ first on sys.path, so one named like a module that something
imports (inspect.py, as a first draft of bench/inspect_prompt.py was; kernels.py, once transformers
began to import the `kernels` package) is what every later import of that name gets, numpy's or
transformers' included: the script dies before its first line of work."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_no_bench_script_shadows_a_standard_or_installed_module():
    names = {p.stem for p in BENCH.glob("*.py")}
    assert names, "no bench scripts found"
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))
    installed = {n for n in names if importlib.util.find_spec(n) is not None}  # bench/ is not on the tests' path
    assert not installed, sorted(installed)
