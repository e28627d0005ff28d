"""The public Python API (saepipe/__init__.py): raw space in and out for every architecture, the
same reconstruction and the same spliced forward as `saepipe eval`, and a run opened from its
config or its folder (store, SAE, records, model, eval, steer)."""

from __future__ import annotations

import json

import pytest
import torch

import saepipe
from pipeline import eval as lm_eval
from pipeline.errors import UserError
from pipeline.metrics import ReconStats
from pipeline.model import splice
from pipeline.saes import ARCHITECTURES, build_sae
from tests.helpers import harvested_llama, run_cli
from tests.test_eval import D, exact_sae  # eval's exact SAE, here under layer_norm



def rows(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows with a large mean and spread of their own, so a layer-normed space is far from the raw one.
    return 3.0 + 2.0 * torch.randn(n, D, generator=g)


def random_dictionary(name: str, normalize: str, transcoder: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(name, D, 4 * D, {"k": 6} if "k" in ARCHITECTURES[name].Settings.__dataclass_fields__ else {},
                    normalize, backend="torch")
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "threshold"):  # fixed-threshold architectures: low enough for some latents to fire
            sae.threshold.fill_(0.05)
        if transcoder:
            sae.make_transcoder(skip=True)
            sae.W_skip.copy_(0.1 * torch.randn(D, D, generator=g))
    sae.eval()
    return sae


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_reconstruction_is_evals_for_every_architecture(name, normalize, transcoder):
    d = random_dictionary(name, normalize, transcoder)
    sae = saepipe.SAE(d)
    x = rows()
    want, idx, vals = d.reconstruct_raw(x)
    code = sae.encode(x)
    assert torch.equal(code.idx, idx) and torch.equal(code.vals, vals)
    assert (vals > 0).any(), "the test SAE fires on nothing"
    torch.testing.assert_close(sae.decode(code), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.reconstruct(x), want, rtol=1e-6, atol=1e-6)
    # leading dims are kept: [2, 24, d] in, [2, 24, d] out, the same rows
    x3 = x.reshape(2, 24, D)
    out3 = sae.reconstruct(x3)
    assert out3.shape == (2, 24, D)
    torch.testing.assert_close(out3.reshape(-1, D), want, rtol=1e-6, atol=1e-6)
    dense = sae.encode(x3).dense()
    assert dense.shape == (2, 24, 4 * D) and torch.equal(sae.encode(x3).l0(), (dense > 0).sum(-1))


def test_encode_decode_round_trips_in_raw_space():
    x = rows()
    d = exact_sae("layer_norm")
    sae = saepipe.SAE(d)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x, rtol=1e-5, atol=1e-5)
    # the internal dictionary's own decode(encode(x)) is the layer-normed row, not x: what the API hides
    inner = d.decode(*d.encode(x))
    torch.testing.assert_close(inner, (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(inner, x, atol=0.1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama harvested at layer 1, a TopK SAE trained on it, collated (root, raw config)."""
    root = tmp_path_factory.mktemp("api")
    raw = harvested_llama(root, n_latents=64)
    raw["train"]["sae"] = {"k": 4}
    for stage in ("train", "collate"):
        res = run_cli(root, raw, stage)
        assert res.exit_code == 0, res.output
    return root, raw


def test_a_run_from_its_config_and_from_its_folder(run, tmp_path, monkeypatch):
    root, raw = run
    monkeypatch.chdir(tmp_path)  # neither depends on the working directory
    r = saepipe.open_run(root / "cfg.yaml")
    sae = r.sae(1)
    assert (sae.layer, sae.hook, sae.architecture, sae.n_latents) == (1, "resid_post", "topk", 64)
    folder = saepipe.open_run(root / "run")
    assert folder.config is None and folder.saes() == [root / "run" / "saes" / "1" / "resid_post"]
    x = folder.store.read_rows(1, "resid_post", 0, 64)
    torch.testing.assert_close(folder.sae(1).reconstruct(x), sae.dictionary.reconstruct_raw(x)[0])
    # records: the same JSON collate wrote
    feats = list(r.features(1))
    assert len(feats) == 64 and r.feature(1, 5) == feats[5]
    # what needs the model says so in one line
    with pytest.raises(UserError, match="needs the run's config"):
        folder.model()
    with pytest.raises(UserError, match="no trained SAE"):
        r.sae(2)


def test_capture_and_tokenize_as_the_store_was_cut(run):
    root, _ = run
    r = saepipe.open_run(root / "cfg.yaml")
    model, tokenizer = r.model()
    ids = torch.from_numpy(r.store.read_tokens(0, 2)).long()
    T = ids.shape[1]
    acts = saepipe.capture(model, ids, [(1, "resid_post")])[(1, "resid_post")]
    torch.testing.assert_close(acts.reshape(-1, D), r.store.read_rows(1, "resid_post", 0, 2 * T))
    t = r.tokenize("def add")
    assert t[0, 0].item() == tokenizer.bos_token_id and t.shape[1] > 1


def test_spliced_forward_is_evals(run):
    """saepipe.spliced gives the logits `saepipe eval` computes (its replacer, BOS passed), and
    Run.evaluate's row is the eval.json the CLI writes."""
    root, raw = run
    r = saepipe.open_run(root / "cfg.yaml")
    model, _ = r.model()
    sae = r.sae(1)
    ids = torch.from_numpy(r.store.read_tokens(0, 4)).long()
    assert lm_eval.passes_bos(sae.cfg)
    with torch.no_grad():
        with saepipe.spliced(model, sae):
            ours = model(input_ids=ids).logits
        stats = ReconStats(D, 64, "cpu")
        with splice(model, 1, "resid_post", lm_eval._replacer(sae.dictionary, True, stats)):
            theirs = model(input_ids=ids).logits
        clean = model(input_ids=ids).logits
    assert torch.equal(ours, theirs) and not torch.allclose(ours, clean)
    [row] = r.evaluate()
    on_disk = json.loads((root / "run" / "saes" / "1" / "resid_post" / "eval.json").read_text())
    assert (row["layer"], row["hook"]) == (1, "resid_post")
    assert row["delta_ce"] == on_disk["delta_ce"] and row["kl"] == on_disk["kl"]


def test_steer_from_python_is_the_clis(run):
    root, raw = run
    r = saepipe.open_run(root / "cfg.yaml")
    texts = r.steer(1, latent=0, prompt="def add", strengths=[2.0], max_new_tokens=3)
    assert set(texts) == {"clean", "2"}
    res = run_cli(root, raw, "steer", "--layer", "1", "--latent", "0", "--strength", "2", "--prompt", "def add",
                  "--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    assert json.dumps(texts["2"], ensure_ascii=False) in res.output


def test_open_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="no config file or run folder"):
        saepipe.open_run(tmp_path / "nothing.yaml")
    with pytest.raises(UserError, match="no activation store"):
        saepipe.open_run(tmp_path).store


def test_the_tutorial_runs(run):
    """docs/tutorial.py end to end on the tiny run: every section prints its result."""
    import subprocess
    import sys
    from pathlib import Path

    root, _ = run
    script = Path(__file__).resolve().parents[1] / "docs" / "tutorial.py"
    res = subprocess.run([sys.executable, str(script), str(root / "cfg.yaml"), "1"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "SAE(topk, layer 1 resid_post, d_model 32, n_latents 64)" in out
    assert "latents firing per token" in out and out.count("its top window:") == 3
    assert "   clean: " in out and "      2x: " in out
    assert "delta CE" in out and "saepipe eval (held out): delta CE" in out
