"""`saepipe export SAE_DIR --format saelens|sparsify --out DIR`: one trained SAE in another tool's layout."""

from __future__ import annotations

from pipeline.export import export


def run(sae_dir, fmt: str, out, member: str | None = None) -> None:
    path = export(sae_dir, fmt, out, member)
    files = ", ".join(sorted(p.name for p in path.iterdir()))
    print(f"export: wrote {fmt} folder {path} ({files})")
