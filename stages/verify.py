"""`saepipe verify RUN_DIR`: check every chunk of a run's activation store
(present, checksum intact, logged as written) and every trained SAE (weights
match the sha256 of their `done` marker); print one line per array and SAE.

Exit 0 when the store is sound; otherwise one `saepipe: error:` line naming the
bad arrays and chunks and how to repair them (`saepipe harvest CONFIG --repair`).
"""

from __future__ import annotations

import time

from pipeline import verify
from pipeline.errors import UserError


def run(run_dir, threads: int = 4) -> list[verify.ArrayReport]:
    t0 = time.perf_counter()
    store, checks = verify.plan(run_dir)
    reports = verify.run(checks, threads)
    for line in verify.summary(store, reports):
        print(line)
    saes = verify.check_saes(run_dir)
    for folder, problem in saes:
        print(f"  {folder.relative_to(run_dir)}  {'BAD: ' + problem if problem else 'ok (sha256)'}")
    message = verify.problems(store, reports)
    if message:
        raise UserError(message)
    bad_saes = [problem for _, problem in saes if problem]
    if bad_saes:
        raise UserError(bad_saes[0] + (f" (and {len(bad_saes) - 1} more SAEs)" if len(bad_saes) > 1 else ""))
    n = sum(len(r.check.chunks) for r in reports)
    print(f"verify: sound: {n} chunks and {len(saes)} SAEs checked in {time.perf_counter() - t0:.1f} s")
    return reports
