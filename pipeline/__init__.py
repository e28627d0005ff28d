import os

__version__ = "0.1.0"

# torch's OpenMP workers spin for a while after each parallel region, on the cores that the C
# kernels (pipeline/cpu_kernels.c) run on next: at the small shape the bf16 screen took 6.6 ms
# instead of 3.3 and the C top-k 3.4 instead of 1.9, and whole steps were 5-10% slower
# (bench/RESULTS.md). Passive workers sleep at once. libgomp reads this when torch loads, so it
# holds where pipeline is imported before torch (the CLI, the benchmarks); a value already set wins.
OMP_WAIT_POLICY_SET = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
