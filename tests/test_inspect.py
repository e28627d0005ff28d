"""saepipe inspect on a tiny Llama harvested at layer 1, a TopK SAE trained and collated on it:
a stored window inspected gives exactly the activations collate computed for it (the SAE's code
of the stored rows, a top record's act); the table, --latent and --html on the CLI, with
explanations when explain's file is of these weights; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from helpers import harvested_llama, run_cli
from pipeline import inspect
from pipeline.collate.explain import FILE
from pipeline.collate.windows import encode_rows
from pipeline.config import config_from_dict
from pipeline.paths import records_dir, sae_dir
from pipeline.saes import load_sae, saved_marker
from pipeline.store import ActivationStore
from pipeline.viewer import read_feature

LAYER, HOOK, CTX, N_LATENTS = 1, "resid_post", 16, 64
PROMPT = "The quick brown fox"  # within the store's windows of 16 tokens
LONG = "The quick brown fox jumps over the lazy dog."  # past them


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The run (root, raw config), collated, with an explanations.json of its SAE's weights."""
    root = tmp_path_factory.mktemp("inspect")
    raw = harvested_llama(root)
    raw["train"]["sae"] = {"k": 4}
    for stage in ("train", "collate"):
        res = run_cli(root, raw, stage)
        assert res.exit_code == 0, res.output
    sha = saved_marker(sae_dir(root / "run", LAYER, HOOK))["sha256"]
    entries = [{"latent": i, "text": f"* pattern{i}", "scores": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3,
                                                                  "corr": 0.1, "n_fires": 3, "n_positions": 9}}
               for i in range(N_LATENTS)]
    (records_dir(root / "run", LAYER, HOOK) / FILE).write_text(
        json.dumps({"format": 1, "fingerprint": {"sae.sha256": sha}, "latents": entries}))
    return root, raw


@pytest.fixture(scope="module")
def loaded(built):
    from pipeline.model import load_model

    root, _ = built
    return load_model(str(root / "model"), "main", "float32", "cpu")


def test_a_stored_window_gives_collates_activations(built, loaded):
    root, raw = built
    cfg = config_from_dict(raw)
    store = ActivationStore(root / "run")
    out = records_dir(root / "run", LAYER, HOOK)
    latent = next(i for i in range(N_LATENTS) if read_feature(out, i)["top"])
    rec = read_feature(out, latent)["top"][0]
    window = rec["doc_id"]
    ids = store.read_tokens(window, window + 1)[0].tolist()

    p = inspect.plan(cfg, ids, loaded=loaded)
    assert p.ids == ids and p.skip_first  # the store's own tokens: BOS first, left out by collate
    [codes] = inspect.encode(p)
    sae = load_sae(sae_dir(root / "run", LAYER, HOOK))
    want_idx, want_vals = encode_rows(sae, store.read_rows(LAYER, HOOK, window * CTX, (window + 1) * CTX), CTX, "cpu")
    assert torch.equal(codes.idx, want_idx) and torch.equal(codes.vals, want_vals)

    acts = codes.dense([latent])[:, 0]
    start = rec.get("window_start", 0)
    assert acts[start + rec["idx"]] == pytest.approx(rec["act"], abs=1e-5)
    shown = np.asarray(rec["acts"], dtype=np.float64)
    here = acts[start:start + len(shown)].astype(np.float64)
    here[:1 - start] = 0 if start == 0 else here[:1 - start]  # collate zeroes the BOS it leaves out
    np.testing.assert_allclose(here, shown, atol=1e-5)

    # the window's text, cut again as the store cut it, is the same tokens and so the same code
    text = p.tokenizer.decode(ids[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again = inspect.plan(cfg, text, loaded=loaded)
    assert again.ids == ids and "".join(again.strings[1:]) == text
    [same] = inspect.encode(again)
    assert torch.equal(same.idx, codes.idx) and torch.equal(same.vals, codes.vals)


def _lines(res) -> list[str]:
    return res.output.splitlines()


def _token_rows(lines: list[str]) -> list[str]:
    """The rows of a table or follow view: from under its column header to the BOS footnote."""
    head = next(j for j, line in enumerate(lines) if line.startswith("pos  "))
    end = next(j for j, line in enumerate(lines) if line.startswith("* position 0"))
    return lines[head + 1:end]


def test_the_table(built, loaded):
    root, raw = built
    res = run_cli(root, raw, "inspect", "--prompt", PROMPT, "--top", "3")
    assert res.exit_code == 0, res.output
    lines = _lines(res)
    assert lines[0].startswith("inspect layer 1 resid_post (topk, 64 latents): top 3 latents per token")
    assert all(len(line) <= inspect.WIDTH for line in lines)
    rows = _token_rows(lines)
    n = len(loaded[1](PROMPT, add_special_tokens=False).input_ids)
    assert len(rows) == 1 + n and rows[0].lstrip().startswith("0*") and '"<|bos|>"' in rows[0]
    col = lines[1].index("latents")  # where the entries start, under the header
    entries = [re.findall(r"(\d+):([\d.e+-]+)", row[col:]) for row in rows]
    assert all(1 <= len(e) <= 3 for e in entries)
    assert any(line.startswith("* position 0 is the BOS") for line in lines)
    # the explanations of the latents in the table, with their F1
    shown = sorted({int(i) for e in entries for i, _ in e})
    for i in shown:
        assert any(re.match(rf"^\s*{i}  0\.33  \* pattern{i}$", line) for line in lines), i


def test_follow_one_latent(built, loaded):
    root, raw = built
    cfg = config_from_dict(raw)
    [codes] = inspect.encode(inspect.plan(cfg, PROMPT, loaded=loaded))
    acts = codes.dense(range(N_LATENTS))[1:]
    latent = int(np.unravel_index(acts.argmax(), acts.shape)[1])
    res = run_cli(root, raw, "inspect", "--prompt", PROMPT, "--latent", str(latent))
    assert res.exit_code == 0, res.output
    lines = _lines(res)
    assert lines[0].startswith(f"inspect layer 1 resid_post (topk, 64 latents): latent {latent}, max ")
    assert lines[1] == f"explanation: * pattern{latent} (f1 0.33, precision 0.50, recall 0.25, corr 0.10)"
    rows = _token_rows(lines)
    assert len(rows) == len(codes.idx)
    assert sum("█" * inspect.BAR in row for row in rows) >= 1  # the largest has the whole bar
    got = [float(row.split('"')[-1].split()[0]) for row in rows]
    np.testing.assert_allclose(got, codes.dense([latent])[:, 0], rtol=5e-3, atol=1e-3)


def test_the_html_page(built, tmp_path):
    root, raw = built
    out = tmp_path / "pages" / "inspect.html"
    res = run_cli(root, raw, "inspect", "--prompt", LONG, "--top", "2", "--html", str(out))
    assert res.exit_code == 0, res.output
    assert " ".join(res.output.split()).startswith("inspect: the prompt's 29 tokens pass the store's windows of 16: "
                                                   "the SAEs never saw positions 16 and later")
    text = out.read_text()
    assert "<script" not in text and "http" not in text  # self-contained
    assert text.count('class="tok"') > 0 and "background:rgba(234,88,12," in text
    assert 'class="tok skip"' in text  # the BOS collate leaves out
    links = re.findall(r'href="([^"]+)#(\d+)"', text)
    assert links and "pattern" in text and "f1 0.33" in text
    for href, latent in links:
        target = (out.parent / unquote(href)).resolve()
        assert target == (records_dir(root / "run", LAYER, HOOK) / "viewer.html").resolve() and target.is_file()
        assert 0 <= int(latent) < N_LATENTS
    assert os.path.relpath(target, out.parent).startswith("..")


def test_explanations_of_other_weights_are_not_shown(built, tmp_path):
    root, raw = built
    raw = {**raw, "run_dir": str(tmp_path / "run")}
    shutil.copytree(root / "run", tmp_path / "run")
    path = records_dir(tmp_path / "run", LAYER, HOOK) / FILE
    made = json.loads(path.read_text())
    made["fingerprint"]["sae.sha256"] = "0" * 64
    path.write_text(json.dumps(made))
    res = run_cli(tmp_path, raw, "inspect", "--prompt", PROMPT)
    assert res.exit_code == 0, res.output
    assert "are of other weights: not shown" in res.output and "pattern" not in res.output


@pytest.mark.parametrize("args, message", [
    (["--prompt", PROMPT, "--latent", str(N_LATENTS)], "--latent 64 is out of range: the SAE of layer 1 hook "
                                                       "resid_post has latents 0..63"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompt", PROMPT, "--layers", "2"], "no trained SAE for layer 2 hook resid_post"),
    (["--prompt", "fox " * 300], "tokens after the BOS the store's windows open with, more than LlamaModel's 256 "
                                 "positions"),
    (["--prompt", PROMPT, "--top", "0"], "--top"),
    (["--prompt", PROMPT, "--html", "."], "--html . is a folder"),
], ids=["latent", "empty", "no-sae", "too-long", "top", "html-folder"])
def test_bad_input_is_one_line(built, args, message):
    root, raw = built
    res = run_cli(root, raw, "inspect", *args)
    assert res.exit_code == 2, res.output
    [line] = res.output.strip().splitlines()
    assert line.startswith("saepipe: error: ") and message in line, line
