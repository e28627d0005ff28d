"""The static viewer, opened from disk in headless Chromium: it renders a latent's
records as tokens, keeps hostile token text inert, lists/searches/sorts latents."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
import torch

from helpers import CORPUS, make_tokenizer
from pipeline.config import config_from_dict
from pipeline.sae import TopKSAE
from pipeline.store import write_synthetic
from stages import collate as stage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and chromedriver (Debian packages chromium, chromium-driver; `make test` installs them)",
)

SCRIPT_TOKEN = "<script>window.__pwned=1</script>"
IMG_TOKEN = '<img src=x onerror="window.__pwned=2">'
CTX, N_SEQ, D = 16, 12, 16


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A collated run whose every sequence holds the two hostile tokens."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("run")
    tok = make_tokenizer(root / "tok")
    tok.add_tokens([SCRIPT_TOKEN, IMG_TOKEN])
    tok.save_pretrained(root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[:, 3] = tok.convert_tokens_to_ids(SCRIPT_TOKEN)
    tokens[:, 9] = tok.convert_tokens_to_ids(IMG_TOKEN)
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "tok")})
    torch.manual_seed(0)
    TopKSAE(D, 32, 4).save(root / "saes/0/resid_post")
    cfg = config_from_dict({
        "run_dir": str(root), "model": {"name": "synthetic"}, "data": {"path": "synthetic"},
        "harvest": {"layers": [0], "n_tokens": N_SEQ * CTX, "context_size": CTX},
        "collate": {"n_top": 4, "n_random": 3, "batch_size": 64},
    })
    [page] = stage.run(cfg)
    return page


@pytest.fixture(scope="module")
def bos_records(tmp_path_factory):
    """A collated run whose sequences open with BOS, excluded (the default)."""
    root = tmp_path_factory.mktemp("bos")
    tok = make_tokenizer(root / "tok")
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[:, 0] = tok.bos_token_id
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "tok"), "prepend_bos": True})
    torch.manual_seed(0)
    sae = TopKSAE(D, 32, 4)
    with torch.no_grad():
        sae.b_lat[0] = 6.0  # fires on every token, BOS included
    sae.save(root / "saes/0/resid_post")
    cfg = config_from_dict({
        "run_dir": str(root), "model": {"name": "synthetic"}, "data": {"path": "synthetic"},
        "harvest": {"layers": [0], "n_tokens": N_SEQ * CTX, "context_size": CTX},
        "collate": {"n_top": 4, "n_random": 3, "batch_size": 64},
    })
    [page] = stage.run(cfg)
    return page


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="saepipe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver, page, fragment: str, shown: str):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri() + fragment)
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == shown)


def _png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_latent_page_shows_tokens_and_keeps_markup_inert(records, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    folder = records.parent
    index = json.loads((folder / "index.json").read_text())
    latent = max(index["latents"], key=lambda r: r["max_act"])["id"]
    feature = json.loads((folder / f"features/{latent}.json").read_text())
    assert feature["top"], "the busiest latent should have records"

    _open(browser, records, f"#{latent}", str(latent))
    shot = tmp_path / "latent.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("SAEPIPE_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["SAEPIPE_SCREENSHOT"])
    width, height = _png_size(shot)
    assert width >= 800 and height >= 600 and shot.stat().st_size > 20_000

    title = browser.find_element(By.ID, "feature-title").text
    assert title.startswith(f"Latent {latent}")
    top_box = browser.find_element(By.ID, "top")
    records_dom = top_box.find_elements(By.CLASS_NAME, "record")
    assert len(records_dom) == len(feature["top"])
    # The first record's spans are its tokens, in order, as text.
    spans = records_dom[0].find_elements(By.CLASS_NAME, "tok")
    got = [browser.execute_script("return arguments[0].textContent", s) for s in spans]
    assert got == [t.replace("\n", "\u21b5\n") for t in feature["top"][0]["tokens"]]
    picked = records_dom[0].find_element(By.CSS_SELECTOR, ".tok.pick")
    assert float(picked.get_attribute("data-act")) == pytest.approx(feature["top"][0]["act"], abs=1e-5)

    # Hostile tokens are text: visible as such, never elements, never run.
    text = browser.execute_script("return document.getElementById('top').textContent")
    assert SCRIPT_TOKEN in text and IMG_TOKEN in text
    assert browser.execute_script("return document.querySelectorAll('main script, main img').length") == 0
    assert browser.execute_script("return window.__pwned === undefined")

    # Hovering a token shows its activation.
    ActionChains(browser).move_to_element(picked).perform()
    tip = browser.find_element(By.ID, "tip")
    assert tip.is_displayed() and "act" in tip.text

    random_box = browser.find_element(By.ID, "random")
    assert len(random_box.find_elements(By.CLASS_NAME, "record")) == len(feature["random"])
    assert "Random positive activations" in browser.find_element(By.TAG_NAME, "main").text


def test_list_search_sort_and_navigation(records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    index = json.loads((records.parent / "index.json").read_text())
    _open(browser, records, "", "overview")
    assert browser.find_element(By.ID, "count").text.startswith(f"{len(index['latents'])} of ")
    overview = browser.find_element(By.ID, "overview").text
    assert f"{len(index['latents'])}" in overview and "dead" in overview

    Select(browser.find_element(By.ID, "sort")).select_by_value("max-desc")
    first = browser.find_element(By.CSS_SELECTOR, "#list li")
    assert int(first.get_attribute("data-id")) == max(index["latents"], key=lambda r: (r["max_act"], -r["id"]))["id"]
    Select(browser.find_element(By.ID, "sort")).select_by_value("density-asc")
    first = browser.find_element(By.CSS_SELECTOR, "#list li")
    assert float(next(r for r in index["latents"] if r["id"] == int(first.get_attribute("data-id")))["density"]) \
        == min(r["density"] for r in index["latents"])

    search = browser.find_element(By.ID, "search")
    search.send_keys("17")
    ids = [int(li.get_attribute("data-id")) for li in browser.find_elements(By.CSS_SELECTOR, "#list li")]
    assert 17 in ids and all(str(i).startswith("17") or "17" in r["top_tokens"]
                             for i in ids for r in index["latents"] if r["id"] == i)

    browser.find_element(By.CSS_SELECTOR, "#list li[data-id='17']").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == "17")
    assert browser.find_element(By.ID, "feature-title").text.startswith("Latent 17")


def test_excluded_bos_is_unshaded_and_left_out_of_the_colour_scale(bos_records, browser):
    from selenium.webdriver.common.by import By

    folder = bos_records.parent
    assert json.loads((folder / "summary.json").read_text())["excluded_positions"] == [0]
    feature = json.loads((folder / "features/0.json").read_text())
    first = feature["top"][0]
    assert first["window_start"] == 0 and first["acts"][0] == 0.0 and first["acts"][first["idx"]] == first["act"]

    # Even a record that carries a value there (records from an older saepipe) must not
    # shade BOS or scale the other tokens by it: plant a huge one in the shard file.
    shard = folder / "viewer_data/features_0.js"
    prefix = "saeViewer.shard(0, ["
    text = shard.read_text()
    body = json.loads("[" + text[len(prefix): text.rindex("]")] + "]")
    body[0]["top"][0]["acts"][0] = 1000.0
    shard.write_text(prefix + "\n" + ",\n".join(json.dumps(f) for f in body) + "\n]);\n")

    _open(browser, bos_records, "#0", "0")
    spans = browser.find_element(By.ID, "top").find_element(By.CLASS_NAME, "record").find_elements(By.CLASS_NAME, "tok")
    colour = "return getComputedStyle(arguments[0]).backgroundColor"
    bos = spans[0]
    assert browser.execute_script(colour, bos) == "rgba(0, 0, 0, 0)"  # unshaded
    assert bos.get_attribute("data-excluded") == "1" and float(bos.get_attribute("data-act")) == 0
    assert "excluded" in bos.get_attribute("title")
    # The picked token holds the latent's largest act shown: full colour, not scaled by 1000.
    assert browser.execute_script(colour, spans[first["idx"]]) == "rgb(234, 88, 12)"
