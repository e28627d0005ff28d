"""saepipe eval against plain-PyTorch references on a tiny random Llama (no harvest needed: the
held-out windows follow the harvest budget, and the SAEs are built and saved directly)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline.config import config_from_dict
from pipeline.eval import run as eval_run
from pipeline.paths import sae_dir
from pipeline.saes import saved_marker
from pipeline.saes.topk import TopKSAE
from stages.cli import main
from tests.helpers import harvest_config, make_model, write_corpus

D, CTX, HARVESTED, LAYER = 32, 16, 24, 1  # harvest_config: 24 windows of 16 tokens, layer 1
N_EVAL = 10  # held-out windows


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_model("llama", root / "model", n_layers=3, d_model=D)
    return root / "model", write_corpus(root / "corpus.jsonl")


def make_cfg(root: Path, model_dir, corpus, hooks=("resid_post",), **ev) -> dict:
    raw = harvest_config(model_dir, corpus, root / "run", hooks=list(hooks))
    raw["eval"] = {"n_tokens": N_EVAL * CTX, "batch_size": 4, "device": "cpu", **ev}
    return raw


def save_sae(root: Path, sae: TopKSAE, hook="resid_post", exclude_bos=True) -> Path:
    folder = sae_dir(root / "run", LAYER, hook)
    sae.save(folder, {"layer": LAYER, "hook": hook, "context_size": CTX, "prepend_bos": True,
                      "exclude_bos": exclude_bos})
    return folder


def exact_sae(normalize: str = "none") -> TopKSAE:
    """Latents +e_i and -e_i with k = d: exactly the positive half fires, so x_hat == x (of what
    encode sees: the layer-normed row under normalize="layer_norm")."""
    sae = TopKSAE(D, 2 * D, D, normalize=normalize, backend="torch")
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_pre.zero_()
        sae.b_lat.zero_()
    return sae


def random_sae(seed=1) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, 4 * D, 6, backend="torch")
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_pre.copy_(0.1 * torch.randn(D, generator=g))
        sae.b_lat.copy_(0.05 * torch.randn(4 * D, generator=g))
    return sae


# ---------------------------------------------------------------------------
# Independent references


def reference_windows(model_dir, corpus) -> torch.Tensor:
    """The harvest's rule written out: docs joined with EOS after each, BOS + 15 tokens per window;
    the eval windows are the N_EVAL after the HARVESTED first ones."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for line in Path(corpus).read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = CTX - 1
    rows = [[tok.bos_token_id] + ids[i * body:(i + 1) * body] for i in range(HARVESTED, HARVESTED + N_EVAL)]
    return torch.tensor(rows)


def reference(model_dir, corpus, sae: TopKSAE, exclude_bos=True) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = reference_windows(model_dir, corpus)
    block = model.model.layers[LAYER]
    start = 1 if exclude_bos else 0
    seen = {}

    def by_hand(x):  # TopK written out: relu of the k largest pre-activations, dense decode
        z = (x - sae.b_pre) @ sae.W_enc.T + sae.b_lat
        top = z.topk(sae.k, dim=-1)
        acts = torch.zeros_like(z).scatter(-1, top.indices, top.values.clamp_min(0))
        return acts @ sae.W_dec + sae.b_pre, acts

    def run(mode):
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            if mode == "zero":
                h[:, start:] = 0
            else:
                x = h[:, start:].clone()
                x_hat, acts = by_hand(x)
                seen.update(x=x.reshape(-1, D), x_hat=x_hat.reshape(-1, D), acts=acts.reshape(-1, acts.shape[-1]))
                h[:, start:] = x_hat
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(hook) if mode else None
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            if handle:
                handle.remove()

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    clean, spliced, zero = run(None), run("sae"), run("zero")
    lp, lq = F.log_softmax(clean[:, :-1], -1), F.log_softmax(spliced[:, :-1], -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    x, x_hat, acts = seen["x"].double(), seen["x_hat"].double(), seen["acts"]
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    with torch.no_grad():
        own_loss = model(input_ids=ids, labels=ids).loss.item()
    out = {"ce_clean": ce(clean), "ce_spliced": ce(spliced), "ce_zero": ce(zero), "kl": kl, "fvu": fvu.item(),
           "l0": (acts > 0).sum(1).double().mean().item(), "dead_frac": ((acts > 0).sum(0) == 0).double().mean().item(),
           "n_tokens": ids.numel(), "own_loss": own_loss}
    out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / (out["ce_zero"] - out["ce_clean"])
    return out


# ---------------------------------------------------------------------------
# Numbers


def test_exact_reconstruction_costs_nothing(tmp_path, llama):
    model_dir, corpus = llama
    folder = save_sae(tmp_path, exact_sae())
    [(layer, hook, row)] = eval_run(config_from_dict(make_cfg(tmp_path, model_dir, corpus)), progress=False)
    assert (layer, hook) == (LAYER, "resid_post")
    assert abs(row["delta_ce"]) < 1e-5 and abs(row["kl"]) < 1e-6 and row["fvu"] < 1e-10
    assert row["l0"] > D - 1 and row["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    ref = reference(model_dir, corpus, exact_sae())
    assert row["ce_clean"] == pytest.approx(ref["own_loss"], abs=1e-5)  # the model's own loss on these windows
    assert row["ce_zero"] == pytest.approx(ref["ce_zero"], abs=1e-5)
    assert json.loads((folder / "eval.json").read_text()) == row


@pytest.mark.parametrize("exclude_bos", [True, False])
def test_numbers_match_a_plain_pytorch_reference(tmp_path, llama, exclude_bos):
    model_dir, corpus = llama
    folder = save_sae(tmp_path, random_sae(), exclude_bos=exclude_bos)
    [(_, _, row)] = eval_run(config_from_dict(make_cfg(tmp_path, model_dir, corpus)), progress=False)
    ref = reference(model_dir, corpus, random_sae(), exclude_bos)
    assert abs(row["delta_ce"]) > 1e-3 and row["kl"] > 1e-3  # a random SAE changes the output: not vacuous
    for key in ("ce_clean", "ce_spliced", "ce_zero", "delta_ce", "ce_recovered", "kl", "fvu", "l0", "dead_frac"):
        assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    assert row["n_tokens"] == ref["n_tokens"] == N_EVAL * CTX
    assert row["ce_clean"] == pytest.approx(ref["own_loss"], abs=1e-5)
    assert row["sae_sha256"] == saved_marker(folder)["sha256"]
    text = (folder / "eval.json").read_text()
    assert set(json.loads(text)) == {*ref} - {"own_loss"} | {"architecture", "sae_sha256", "fingerprint"}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


# ---------------------------------------------------------------------------
# CLI: skip, force, errors


def _cli(root: Path, raw: dict, *args):
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, ["eval", str(path), *args])


def test_skip_when_done_force_and_retrained(tmp_path, llama):
    model_dir, corpus = llama
    raw = make_cfg(tmp_path, model_dir, corpus)
    folder = save_sae(tmp_path, random_sae())
    res = _cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    assert "ce_recovered" in res.output and "resid_post" in res.output
    first = json.loads((folder / "eval.json").read_text())
    marked = {**first, "ce_clean": 123.0}  # a finished eval is not recomputed: the mark survives
    (folder / "eval.json").write_text(json.dumps(marked))
    res = _cli(tmp_path, raw)
    assert res.exit_code == 0 and "skipping" in res.output and "123.0000" in res.output, res.output
    assert json.loads((folder / "eval.json").read_text()) == marked
    res = _cli(tmp_path, raw, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((folder / "eval.json").read_text()) == first
    save_sae(tmp_path, random_sae(seed=2))  # retrained: new weights make the old eval stale
    res = _cli(tmp_path, raw)
    again = json.loads((folder / "eval.json").read_text())
    assert res.exit_code == 0 and again["sae_sha256"] != first["sae_sha256"] and again["fvu"] != first["fvu"]


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), res.output
    for n in needles:
        assert n in lines[0], res.output


def test_no_trained_sae(tmp_path, llama):
    res = _cli(tmp_path, make_cfg(tmp_path, *llama))
    _one_line_error(res, "no trained SAE for layer 1 hook resid_post")


def test_encoder_has_no_lm_head(tmp_path):
    make_model("bert", tmp_path / "bert", n_layers=2, d_model=D)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    folder = save_sae(tmp_path, random_sae())
    _one_line_error(_cli(tmp_path, make_cfg(tmp_path, tmp_path / "bert", corpus)), "no language-model head")
    assert not (folder / "eval.json").exists()


def test_hook_not_residual_shape(tmp_path, llama):
    sae = TopKSAE(2 * D, 4 * D, 4, backend="torch")  # mlp.act_fn is the MLP's hidden width, 2 * d_model
    folder = save_sae(tmp_path, sae, hook="mlp.act_fn")
    res = _cli(tmp_path, make_cfg(tmp_path, *llama, hooks=("mlp.act_fn",)))
    _one_line_error(res, "mlp.act_fn", "not the residual shape")
    assert not (folder / "eval.json").exists()


def test_index_page_shows_the_eval_numbers(tmp_path, llama):
    """A run collated before eval: eval rewrites records/index.html with its columns for that SAE."""
    from pipeline import viewer

    run_dir = tmp_path / "run"
    save_sae(tmp_path, random_sae())
    (run_dir / "records/1/resid_post").mkdir(parents=True)
    (run_dir / "records/1/resid_post/done").write_text("{}")  # a finished records folder stands in
    viewer.write_index_page(run_dir)
    assert "<th>CE spliced</th>" not in viewer.index_page(run_dir).read_text()  # no eval yet: no such columns
    [(_, _, row)] = eval_run(config_from_dict(make_cfg(tmp_path, *llama)), progress=False)
    page = viewer.index_page(run_dir).read_text()
    cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", page)]
    assert "<th>CE spliced</th>" in page and cells[-8:] == [f"{row['ce_clean']:.4g}", f"{row['ce_spliced']:.4g}",
                                                   f"{row['delta_ce']:.4g}", f"{row['ce_recovered']:.2%}",
                                                   f"{row['kl']:.4g}", f"{row['fvu']:.4g}", f"{row['dead_frac']:.2%}",
                                                   f"{row['n_tokens']:,}"]


def test_another_models_sae_and_a_held_lock(tmp_path, llama):
    from pipeline.fsio import run_lock

    raw = make_cfg(tmp_path, *llama)
    folder = sae_dir(tmp_path / "run", LAYER, "resid_post")
    random_sae().save(folder, {"model": "org/other-model", "context_size": CTX, "prepend_bos": True})
    _one_line_error(_cli(tmp_path, raw), "trained on model 'org/other-model'")
    save_sae(tmp_path, random_sae())
    with run_lock(tmp_path / "run", f"eval.{LAYER}.resid_post"):
        _one_line_error(_cli(tmp_path, raw), "another `saepipe eval` is working on layer 1 hook resid_post")
    assert not (folder / "eval.json").exists()
