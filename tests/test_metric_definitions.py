"""One set of metric definitions (pipeline/metrics.py): FVU and the dead share read the same in
train's final line, cfg.json, eval.json, the index page and the viewer's data wherever they
describe the same tokens, and say which tokens (and which space) where they do not. Train's
raw FVU is checked against a hand computation on the rows it held out."""

from __future__ import annotations

import json
import os
import re

import torch

from pipeline.loader import RowFilter, eval_rows
from pipeline.saes import load_sae
from pipeline.store import ActivationStore
from tests.helpers import harvested_llama, run_cli


def cells_of(page: str) -> tuple[list[str], list[list[str]]]:
    """(the header's column names, each body row's cell texts) of the index page's layer table."""
    table = re.search(r'<table id="layers">(.*?)</table>', page, re.S).group(1)
    head = [re.sub(r"\s+", " ", h) for h in re.findall(r"<th>(.*?)</th>", table, re.S)]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("</thead>")[1], re.S)
    return head, [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows]


def test_fvu_and_dead_agree_across_every_report_and_name_their_tokens(tmp_path):
    raw = harvested_llama(tmp_path, n_latents=64, normalize="layer_norm")
    raw["train"]["sae"] = {"k": 4}
    res = run_cli(tmp_path, raw, "train")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "done;" in x)
    for stage in ("eval", "collate"):
        got = run_cli(tmp_path, raw, stage)
        assert got.exit_code == 0, got.output
    run = tmp_path / "run"
    folder = run / "saes" / "1" / "resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    ev = cfg["eval"]
    lm = json.loads((folder / "eval.json").read_text())
    summary = json.loads((run / "records" / "1" / "resid_post" / "summary.json").read_text())

    # train's line: both FVUs, its space named, the dead share and its token count, as cfg.json has them
    assert (f"held-out FVU {ev['fvu']:.4f} layer-normed, {ev['fvu_raw']:.4f} raw; dead {ev['dead_frac']:.1%}; "
            f"on {ev['eval_tokens']:,} held-out store tokens") in line, line

    # the raw FVU and dead share by hand, on the rows train held out (BOS left out)
    store = ActivationStore(run)
    rf = RowFilter(store, 1, "resid_post", True, False)
    x = eval_rows(store, 1, "resid_post", cfg["eval_chunks"], raw["train"]["eval_tokens"], rf).double()
    assert x.shape[0] == ev["eval_tokens"]
    sae = load_sae(folder)
    x_hat, idx, vals = sae.reconstruct_raw(x.float())
    fvu_raw = ((x - x_hat.double()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    fired[idx[vals > 0]] = True
    assert abs(fvu_raw.item() - ev["fvu_raw"]) <= 1e-5 * fvu_raw.item()
    assert ev["dead_frac"] == (~fired).float().mean().item()
    assert abs(ev["fvu"] - ev["fvu_raw"]) > 1e-3  # the layer-normed space really is another one here

    # the index page: every number under a header that says whose tokens it counts
    page = (run / "records" / "index.html").read_text()
    head, [row] = cells_of(page)
    col = dict(zip(head, row))
    assert col["store tokens"] == f"{summary['n_tokens']:,}" and col["dead"] == str(summary["dead"])
    assert col["train FVU"] == f"{ev['fvu']:.4g} (layer-normed)" and col["train FVU raw"] == f"{ev['fvu_raw']:.4g}"
    assert col["train dead"] == f"{ev['dead_frac']:.2%}" and col["train tokens"] == f"{ev['eval_tokens']:,}"
    assert col["eval FVU raw"] == f"{lm['fvu']:.4g}" and col["eval dead"] == f"{lm['dead_frac']:.2%}"
    assert col["eval tokens"] == f"{lm['n_tokens']:,}"
    assert "store tokens" in page and "over train tokens" in page  # the definitions below the table

    # the viewer's data: train's numbers with their space and tokens, eval's through eval.js, the pictures
    assert summary["train_eval"] == {"fvu": ev["fvu"], "fvu_space": "layer-normed", "fvu_raw": ev["fvu_raw"],
                                     "dead_frac": ev["dead_frac"], "tokens": ev["eval_tokens"]}
    script = (run / "records" / "1" / "resid_post" / "viewer_data" / "eval.js").read_text()
    assert json.dumps(lm["fvu"]) in script and json.dumps(lm["n_tokens"]) in script
    records = run / "records" / "1" / "resid_post"
    assert os.path.samefile(records / summary["loss_png"], folder / "loss.png")
    assert (records / summary["density_png"]).exists()
    assert 'href="../saes/1/resid_post/loss.png"' in page and 'href="1/resid_post/density.png"' in page
