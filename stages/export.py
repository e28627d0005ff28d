"""`saepipe export SAE_DIR --format saelens|sparsify|neuronpedia --out DIR`: one trained SAE in
another tool's layout (neuronpedia: its records and explanations as Neuronpedia's upload batches)."""

from __future__ import annotations

from pipeline.export import export


def run(sae_dir, fmt: str, out, member: str | None = None, np_model_id: str | None = None,
        np_set_name: str | None = None) -> None:
    path = export(sae_dir, fmt, out, member, np_model_id, np_set_name)
    if fmt == "neuronpedia":  # hundreds of batch files: the manifest's counts, not their names
        from pipeline import neuronpedia

        print(neuronpedia.summary(path))
        return
    files = ", ".join(sorted(p.name for p in path.iterdir()))
    print(f"export: wrote {fmt} folder {path} ({files})")
