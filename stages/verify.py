"""`saepipe verify RUN_DIR|CONFIG`: check every chunk of a run's activation store
(present, checksum intact, logged as written) and every trained SAE (weights
match the sha256 of their `done` marker); print one line per array and SAE.

Exit 0 when the store and the SAEs are sound; otherwise one `saepipe: error:` line
naming the bad arrays and chunks and how to repair them (`saepipe harvest CONFIG
--repair`), then the damaged SAEs and how to retrain them.
The checks: pipeline/verify.py.
"""

from __future__ import annotations

import time

from pipeline import verify
from pipeline.errors import UserError


def run(where, threads: int = 4) -> verify.Report:
    """`where`: a run_dir, or a pipeline.store.Location (a config's store)."""
    t0 = time.perf_counter()
    report = verify.run(where, threads)
    for line in report.lines():
        print(line)
    problem = report.problem()
    if problem:
        raise UserError(problem)
    print(f"verify: sound: {report.n_chunks} chunks and {len(report.saes)} SAEs checked in "
          f"{time.perf_counter() - t0:.1f} s")
    return report
