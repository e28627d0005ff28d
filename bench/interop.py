"""Do the tools people use read our exported SAEs as we do? SAELens 6, in its own venv.

    python bench/interop.py            # every architecture that exports to SAELens; prints a table

For each architecture whose `exports` list "saelens": a random SAE (biases and any threshold
or gate made nonzero, so no term can hide), exported with `saepipe export --format saelens`,
loaded by SAELens (`SAE.load_from_disk`) in bench/.peers/saelens (bench/peers.py builds it),
and run on the same 1024 rows. Compared: the latent activations (SAELens' encode against our
encode, densified) and the reconstruction in the activations' own space (SAELens'
decode(encode(x)), which undoes its layer norm, against our reconstruct_raw), as the largest
difference relative to the largest magnitude. tests/test_interop.py asserts the same where the
venv exists. Transcoders too ("<architecture> transcoder", "... skip transcoder": every
architecture SAELens holds as one, on raw inputs): their prediction against SAELens's
decode(encode(x)), W_skip x included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402,F401  (before torch: its OpenMP setting, as the CLI has it)
import torch  # noqa: E402
from safetensors.torch import load_file, save_file

# Run as a script, bench/ leads sys.path, where a script named like a package (bench/kernels.py
# once shadowed the `kernels` transformers imports; tests/test_bench_names.py)
# would win: the repository instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from pipeline.export import export  # noqa: E402
from pipeline.saes import ARCHITECTURES, build_sae  # noqa: E402

ROWS, D, N = 1024, 48, 192

# Runs inside the SAELens venv: imports only SAELens and torch.
PEER = """
import sys
import torch  # noqa: E402
from safetensors.torch import load_file, save_file
from sae_lens import SAE

for folder, rows, out in zip(*[iter(sys.argv[1:])] * 3):  # (folder, rows, out) triples: one start for all
    sae = SAE.load_from_disk(folder, device="cpu")
    x = load_file(rows)["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        # A skip transcoder's W_skip x is part of its forward, not of decode.
        x_hat = sae(x) if getattr(sae, "W_skip", None) is not None else sae.decode(acts)
    save_file({"acts": acts.contiguous(), "x_hat": x_hat.contiguous()}, out)
"""


def peer_python() -> Path:
    return Path(__file__).resolve().parent / ".peers" / "saelens" / "bin" / "python"


TRANSCODES = {"transcoder": False, "skip transcoder": True}  # the kinds of transcoder, and whether it has W_skip
SAELENS_TRANSCODERS = ("relu", "jumprelu", "batchtopk", "matryoshka")  # the architectures SAELens holds as one


def candidate(name: str, seed: int = 0, normalize: str = "layer_norm"):
    """A random SAE of architecture `name` ("<architecture> transcoder" / "... skip transcoder": that
    architecture as a transcoder): biases (and any gate, magnitude or skip parameter) nonzero, a
    BatchTopK threshold as training leaves one; other buffers as the architecture makes them."""
    torch.manual_seed(seed)
    arch, _, kind = name.partition(" ")
    sae = build_sae(arch, D, N, {}, normalize=normalize, backend="torch")
    if kind:
        sae.make_transcoder(TRANSCODES[kind])
    with torch.no_grad():
        for key, t in sae.named_parameters():
            if key not in ("W_enc", "W_dec"):
                t.add_(0.05 * torch.randn_like(t))
        for key, t in sae.named_buffers():
            if key == "threshold":  # BatchTopK's, as training leaves it: positive, below most that fire
                t.copy_(0.05 + 0.1 * torch.rand_like(t))
    return sae


def compare(names: list[str], root: Path, normalize: str = "layer_norm") -> list[dict]:
    """Export each architecture's SAE, run SAELens on all of them in one process, and return
    per architecture the relative differences and how many activations were live."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, D, generator=g) * 3 + 0.5
    save_file({"x": x}, str(root / "rows.safetensors"))
    saes, args = {}, []
    for name in names:
        saes[name] = sae = candidate(name, normalize=normalize)
        where = ({"layer": 0, "hook": "mlp_in", "target_hook": "mlp_out"} if sae.transcoder else
                 {"layer": 0, "hook": "resid_post"})
        sae.save(root / name / "sae", where)
        out = export(root / name / "sae", "saelens", root / name / "saelens")
        args += [str(out), str(root / "rows.safetensors"), str(root / name / "theirs.safetensors")]
    done = subprocess.run([str(peer_python()), "-c", PEER, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"SAELens could not run the exports:\n{done.stderr[-3000:]}")

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    rows = []
    for name, sae in saes.items():
        theirs = load_file(str(root / name / "theirs.safetensors"))
        with torch.no_grad():
            ours_acts, ours_hat = sae.encode_dense(x), sae.reconstruct_raw(x)[0]
        saelens_name = json.loads((root / name / "saelens" / "cfg.json").read_text())["architecture"]
        rows.append({"architecture": name, "saelens_name": saelens_name, "normalize": normalize,
                     "acts": rel(theirs["acts"], ours_acts), "x_hat": rel(theirs["x_hat"], ours_hat),
                     "live": int((ours_acts > 0).sum())})
    return rows


def transcoders() -> list[str]:
    """The transcoders SAELens holds, each kind."""
    return [f"{arch} {kind}" for arch in SAELENS_TRANSCODERS for kind in TRANSCODES]


def main():
    if not peer_python().exists():
        sys.exit("interop: no SAELens venv; make it with: python bench/peers.py saelens")
    names = [n for n, cls in ARCHITECTURES.items() if "saelens" in cls.exports]
    rows = []
    for normalize in ("layer_norm", "none"):
        with tempfile.TemporaryDirectory() as tmp:
            rows += compare(names + (transcoders() if normalize == "none" else []), Path(tmp), normalize)
    print(json.dumps(rows, indent=2))
    print(f"{'architecture':<28} {'normalize':<10} {'as SAELens':<24} {'encode rel diff':>16} "
          f"{'reconstruction rel diff':>24}")
    for r in rows:
        print(f"{r['architecture']:<28} {r['normalize']:<10} {r['saelens_name']:<24} {r['acts']:>16.2e} "
              f"{r['x_hat']:>24.2e}")


if __name__ == "__main__":
    main()
