"""saepipe steer on a tiny random Llama: strength 0 is the clean generation, a decoder row
built to raise one token's logit makes the model say it, the prompt is cut as the store's
windows were (BOS first when they opened with it), position 0 is left alone where the SAE
never saw it (prefill and every generated step), relative strengths (2x) are that many
times the latent's max activation in its collated records, bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import harvest_config, make_model, write_corpus
from pipeline import steer
from pipeline.config import config_from_dict
from pipeline.data import make_windows
from pipeline.paths import records_dir, sae_dir
from pipeline.saes import load_sae
from pipeline.saes.topk import TopKSAE
from pipeline.store import ActivationStore, Location
from stages.cli import main

LAYERS, D, N_LATENTS, NEW = 3, 32, 16, 8
DEAD = N_LATENTS - 1  # the collated SAE's latent that never fires
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = make_model("llama", folder, n_layers=LAYERS, d_model=D)
    return folder, model


def _setup(tmp_path, model_dir, layer=LAYERS - 1, rows: dict | None = None, sae_cfg: dict | None = None):
    """A config on model_dir and a saved SAE at (layer, resid_post) whose decoder rows are `rows`
    (and whose cfg.json has `sae_cfg` in it: prepend_bos, exclude_bos as train writes them)."""
    raw = harvest_config(model_dir, write_corpus(tmp_path / "corpus.jsonl", 4), tmp_path / "run", layers=[layer])
    sae = TopKSAE(D, N_LATENTS, k=4)
    with torch.no_grad():
        for i, row in (rows or {}).items():
            sae.W_dec[i] = row
    sae.save(sae_dir(tmp_path / "run", layer, "resid_post"), extra_cfg=sae_cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config_from_dict(raw), path


def _generate(model, tokenizer, prompt=PROMPT, ids: list[int] | None = None) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids if ids is None else torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_strength_zero_is_the_clean_generation(tmp_path, llama):
    from transformers import AutoTokenizer

    folder, model = llama
    cfg, _ = _setup(tmp_path, folder)
    lines = []
    rows = steer.run(cfg, LAYERS - 1, 3, [0.0, 5.0], PROMPT, max_new_tokens=NEW, echo=lines.append)
    want = _generate(model, AutoTokenizer.from_pretrained(folder))
    assert rows["clean"] == want
    assert rows["0"] == want
    assert len(lines) == 6 and lines[-2].strip().startswith("0 ") and lines[-1].strip().startswith("5 ")


def test_large_strength_along_a_token_direction_says_that_token(tmp_path, llama):
    from transformers import AutoTokenizer

    folder, model = llama
    tokenizer = AutoTokenizer.from_pretrained(folder)
    clean = _generate(model, tokenizer)
    # The residual direction that maximises token t's logit through RMSNorm and W_U is
    # g * W_U[t] (scale-invariant norm): pick a t the clean run never says, for which it wins.
    g, W_U = model.model.norm.weight.detach(), model.lm_head.weight.detach()
    target, row = None, None
    for t in W_U.norm(dim=1).argsort(descending=True).tolist():
        if t in clean or t in tokenizer.all_special_ids:
            continue
        d = g * W_U[t]
        d = d / d.norm()
        if int((W_U @ (g * d)).argmax()) == t:
            target, row = t, d
            break
    assert target is not None
    cfg, _ = _setup(tmp_path, folder, rows={5: row})
    rows = steer.run(cfg, LAYERS - 1, 5, [0.0, 1000.0], PROMPT, max_new_tokens=NEW, echo=lambda _: None)
    assert target not in rows["0"]
    assert target in rows["1000"]


BOS_CASES = {  # cfg.json's (prepend_bos, exclude_bos) -> (BOS first in the prompt, position 0 steered)
    "unrecorded": ({}, False, True),
    "bos-excluded": ({"prepend_bos": True, "exclude_bos": True}, True, False),
    "bos-trained": ({"prepend_bos": True, "exclude_bos": False}, True, True),
    "no-bos": ({"prepend_bos": False, "exclude_bos": True}, False, True),
}


def _store_ids(tokenizer, bos: bool) -> list[int]:
    """PROMPT as harvest cuts it: make_windows' one window of it, BOS first when `bos`."""
    n = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)
    windows, used = make_windows([PROMPT], tokenizer, n + bos, 1, bos, progress=False)
    assert used == bos and len(windows) == 1
    return windows[0].tolist()


@pytest.mark.parametrize("case", sorted(BOS_CASES))
def test_the_prompt_is_cut_as_the_store_was(tmp_path, llama, case):
    from transformers import AutoTokenizer

    folder, _ = llama
    sae_cfg, bos, _ = BOS_CASES[case]
    cfg, _ = _setup(tmp_path, folder, sae_cfg=sae_cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    p = steer.plan(cfg, LAYERS - 1, 3, [1.0], PROMPT, max_new_tokens=NEW)
    ids = p.prompt_ids[0].tolist()
    if case == "unrecorded":  # nothing says how the store was cut: the tokenizer's own encoding
        assert ids == tokenizer(PROMPT).input_ids
    else:
        assert ids == _store_ids(tokenizer, bos)
    assert (ids[0] == tokenizer.bos_token_id) == bos and tokenizer.bos_token_id not in ids[1:]


@pytest.mark.parametrize("case", sorted(BOS_CASES))
def test_position_zero_is_left_alone_at_prefill_and_every_step(tmp_path, llama, case):
    """Block L's output before the splice (a hook registered first) and after it (the final
    norm's input), at each of greedy's forwards: the prompt's, then one per new token."""
    folder, _ = llama
    sae_cfg, _, steer_first = BOS_CASES[case]
    cfg, _ = _setup(tmp_path, folder, sae_cfg=sae_cfg)
    p = steer.plan(cfg, LAYERS - 1, 7, [6.0], PROMPT, max_new_tokens=NEW)
    assert p.pass_bos == (not steer_first)
    model, s, row = p.model, 6.0, p.direction
    before, after = [], []

    def run(strength=None):
        before.clear(), after.clear()
        handles = [model.model.layers[LAYERS - 1].register_forward_hook(lambda m, i, o: before.append(o.clone())),
                   model.model.norm.register_forward_pre_hook(lambda m, a: after.append(a[0].clone()))]
        try:
            eos = p.tokenizer.eos_token_id
            return steer.greedy(model, p.prompt_ids, NEW, eos) if strength is None else steer.steered(p, strength)
        finally:
            for h in handles:
                h.remove()

    run()
    clean_first = after[0][:, 0]
    out = run(s)
    T = p.prompt_ids.shape[1]
    assert len(after) == len(before) == len(out) and [a.shape[1] for a in after] == [T] + [1] * (len(out) - 1)
    pushed = [a - b for a, b in zip(after, before)]
    want = (s * row).expand_as(pushed[0][:, 1:])
    torch.testing.assert_close(pushed[0][:, 1:], want)  # the prompt's other positions
    for step in pushed[1:]:  # each new token is steered: its forward's first position is not position 0
        torch.testing.assert_close(step, (s * row).expand_as(step))
    if steer_first:
        torch.testing.assert_close(pushed[0][:, 0], s * row[None])
    else:  # bit for bit what the unsteered forward has there
        assert torch.equal(after[0][:, 0], before[0][:, 0]) and torch.equal(after[0][:, 0], clean_first)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
@pytest.mark.parametrize("case", ["unrecorded", "bos-excluded"])
def test_steered_generation_matches_a_hand_written_hook(tmp_path, llama, normalize, case):
    """x + S * W_dec[i] at every position of block L's output (times std(x) per token for a
    layer-normed SAE) but position 0 where the SAE never saw it, checked against generate()
    under a plain forward hook that reads each position from the model's position_ids: each
    generated token is steered, though it is the first (only) position of its forward. (This tiny
    random model's text barely feels position 0 alone; the hidden states check it exactly.)"""
    from transformers import AutoTokenizer

    folder, model = llama
    sae_cfg, bos, steer_first = BOS_CASES[case]
    layer = LAYERS - 2
    cfg, _ = _setup(tmp_path, folder, layer=layer, sae_cfg=sae_cfg)
    path = sae_dir(tmp_path / "run", layer, "resid_post")
    sae = load_sae(path)
    sae.normalize = sae.cfg["normalize"] = normalize
    sae.save(path)
    row, s = sae.W_dec[7].detach(), 6.0
    positions = []

    def add(_mod, _inp, kwargs, out):
        x = out[0] if isinstance(out, tuple) else out
        where = kwargs["position_ids"]
        positions.append(where[0].tolist())
        keep = torch.ones_like(where) if steer_first else (where != 0)
        x = x + s * row * keep[..., None] * (x.std(-1, keepdim=True) if normalize == "layer_norm" else 1.0)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = _store_ids(tokenizer, bos) if case != "unrecorded" else None
    handle = model.model.layers[layer].register_forward_hook(add, with_kwargs=True)
    try:
        want = _generate(model, tokenizer, ids=ids)
    finally:
        handle.remove()
    assert positions[0][0] == 0 and all(len(q) == 1 and q[0] > 0 for q in positions[1:])
    rows = steer.run(cfg, layer, 7, [s], PROMPT, max_new_tokens=NEW, echo=lambda _: None)
    assert rows["6"] == want and rows["6"] != rows["clean"]


def _cli(path, *args):
    return CliRunner().invoke(main, ["steer", str(path), *args])


def _one_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: "), result.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_cli_prints_a_row_per_strength(tmp_path, llama):
    _, path = _setup(tmp_path, llama[0])
    result = _cli(path, "--layer", str(LAYERS - 1), "--latent", "2", "--strength", "0", "--strength", "3",
                  "--prompt", PROMPT, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    rows = result.output.strip().splitlines()[-3:]
    assert [r.split()[0] for r in rows] == ["clean", "0", "3"]
    assert rows[0].split(None, 1)[1] == rows[1].split(None, 1)[1]  # strength 0 is the clean text


def test_cli_errors(tmp_path, llama):
    _, path = _setup(tmp_path, llama[0])
    base = ["--strength", "1", "--prompt", PROMPT]
    _one_line(_cli(path, "--layer", str(LAYERS - 1), "--latent", str(N_LATENTS), *base),
              f"--latent {N_LATENTS} is out of range", f"0..{N_LATENTS - 1}")
    _one_line(_cli(path, "--layer", "0", "--latent", "1", *base), "no trained SAE for layer 0 hook resid_post")
    _one_line(_cli(path, "--layer", str(LAYERS - 1), "--latent", "1", "--strength", "1", "--prompt", "  "),
              "--prompt is empty")


def test_cli_encoder_model_is_refused(tmp_path):
    bert = tmp_path / "bert"
    make_model("bert", bert, n_layers=2, d_model=D)
    _, path = _setup(tmp_path, bert, layer=1)
    _one_line(_cli(path, "--layer", "1", "--latent", "1", "--strength", "1", "--prompt", PROMPT),
              "no language-model head")


# ---- relative strengths: times the latent's max activation in its collated records

@pytest.fixture(scope="module")
def collated(tmp_path_factory, llama):
    """A run harvested from the tiny Llama, a hand-made SAE at (LAYERS - 1, resid_post) saved with
    the store's prepend_bos (latent DEAD never fires), its records collated; (root, raw config,
    the latent of the largest max_act, that max_act as index.json says)."""
    root = tmp_path_factory.mktemp("collated")
    raw = harvest_config(llama[0], write_corpus(root / "corpus.jsonl", 40), root / "run", layers=[LAYERS - 1])
    raw["collate"] = {"n_top": 3, "n_random": 2, "batch_size": 256, "device": "cpu"}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(main, ["harvest", str(path)])
    assert res.exit_code == 0, res.output
    attrs = ActivationStore(Location.of(config_from_dict(raw))).attrs
    torch.manual_seed(1)
    sae = TopKSAE(D, N_LATENTS, k=4)
    with torch.no_grad():  # latent DEAD never makes the top k
        sae.W_enc[DEAD], sae.b_lat[DEAD] = 0.0, -1e3
    sae.save(sae_dir(root / "run", LAYERS - 1, "resid_post"),
             extra_cfg={"prepend_bos": attrs["prepend_bos"], "exclude_bos": True})
    res = CliRunner().invoke(main, ["collate", str(path)])
    assert res.exit_code == 0, res.output
    index = json.loads((records_dir(root / "run", LAYERS - 1, "resid_post") / "index.json").read_text())
    live = max(index["latents"], key=lambda r: r["max_act"])
    assert live["max_act"] > 0
    return root, raw, live["id"], live["max_act"]


def _copy(tmp_path, collated):
    root, raw, latent, top = collated
    shutil.copytree(root / "run", tmp_path / "run")
    raw = {**raw, "run_dir": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config_from_dict(raw), path, latent, top


def test_relative_strength_is_that_many_times_the_max_activation(tmp_path, collated):
    cfg, path, latent, top = _copy(tmp_path, collated)
    lines = []
    rows = steer.run(cfg, LAYERS - 1, latent, ["2x", 3.0, "0.5x"], PROMPT, max_new_tokens=NEW, echo=lines.append)
    assert list(rows) == ["clean", "2x", "3", "0.5x"]
    p = steer.plan(cfg, LAYERS - 1, latent, ["2x", "-1.5X"], PROMPT, max_new_tokens=NEW)
    assert p.strengths == {"2x": 2 * top, "-1.5x": -1.5 * top}
    # the same rows as the raw strengths they stand for
    raw_rows = steer.run(cfg, LAYERS - 1, latent, [2 * top, 0.5 * top], PROMPT, max_new_tokens=NEW,
                         echo=lambda _: None)
    assert rows["2x"] == raw_rows[steer.strength_key(2 * top)] and rows["0.5x"] == raw_rows[steer.strength_key(top / 2)]
    # the raw value of each relative strength is printed: a note, and beside its row
    assert f"steer: --strength 2x is 2 x latent {latent}'s max activation {top:.6g} (its collated records): " \
           f"{2 * top:.6g} x the decoder row" in lines
    table = {line.split()[0]: line for line in lines[lines.index(next(x for x in lines if "continuation" in x)):]}
    assert f"2x={2 * top:.4g}" in table and f"0.5x={top / 2:.4g}" in table and "3" in table

    res = _cli(path, "--layer", str(LAYERS - 1), "--latent", str(latent), "--strength", "2x", "--strength", "2.0x",
               "--prompt", PROMPT, "--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    assert "steer: --strength 2x is given 2 times; one row for it (greedy is deterministic)" in res.output
    assert f"{2 * top:.6g} x the decoder row" in res.output
    assert res.output.strip().splitlines()[-1].split()[0] == f"2x={2 * top:.4g}"


def test_relative_strength_errors(tmp_path, collated):
    _, path, latent, _ = _copy(tmp_path, collated)
    base = ["--layer", str(LAYERS - 1), "--latent", str(latent), "--prompt", PROMPT]
    for bad in ("2y", "x", "", "2xx", "nanx"):
        _one_line(_cli(path, *base, "--strength", "1", "--strength", bad), "--strength")
    _one_line(_cli(path, *base, "--strength", "2y"), "--strength '2y' is not a strength", "number followed by x")
    _one_line(_cli(path, *base, "--strength", "x"), "--strength 'x' is not a strength")
    _one_line(_cli(path, *base, "--strength", "infx"), "--strength infx is not a finite number")

    # the SAE retrained since the records were made: they are of other weights
    folder = sae_dir(tmp_path / "run", LAYERS - 1, "resid_post")
    sae = load_sae(folder)
    with torch.no_grad():
        sae.W_dec.mul_(2)
    sae.save(folder)
    _one_line(_cli(path, *base, "--strength", "2x"), "are of other weights", "the SAE was retrained",
              f"saepipe collate CONFIG --layers {LAYERS - 1}", "give a raw strength")

    # no records at all
    shutil.rmtree(records_dir(tmp_path / "run", LAYERS - 1, "resid_post"))
    _one_line(_cli(path, *base, "--strength", "8", "--strength", "2x"), "--strength 2x is relative",
              "has no collated records", f"run `saepipe collate CONFIG --layers {LAYERS - 1}`", "give a raw strength")
    res = _cli(path, *base, "--strength", "8", "--max-new-tokens", "2")  # raw strengths need no records
    assert res.exit_code == 0, res.output


def test_a_latent_that_never_fired_has_no_relative_strength(tmp_path, collated):
    _, path, _, _ = _copy(tmp_path, collated)
    index = json.loads((records_dir(tmp_path / "run", LAYERS - 1, "resid_post") / "index.json").read_text())
    assert index["latents"][DEAD]["max_act"] == 0
    _one_line(_cli(path, "--layer", str(LAYERS - 1), "--latent", str(DEAD), "--strength", "1x", "--prompt", PROMPT),
              f"latent {DEAD} of layer {LAYERS - 1} hook resid_post never fired", "give a raw strength")
