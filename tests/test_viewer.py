"""The static viewer, opened from disk in headless Chromium: it renders a latent's
records as tokens, keeps hostile token text inert, lists/searches/sorts latents,
finds a latent by the tokens of its top records, and the run's index page links
each layer's viewer."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile

import numpy as np
import pytest
import torch

from helpers import CORPUS, make_tokenizer
from pipeline.config import config_from_dict
from pipeline.saes.topk import TopKSAE
from pipeline.store import write_synthetic
from pipeline.viewer import read_feature
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
TOPIC, DEAD = 31, 30  # latents rigged below
# (sequence, position, act on input dim 0): TOPIC fires only here, its 4th best on "denominator".
TOPIC_ROWS = [(1, 5, 100.0), (4, 6, 90.0), (7, 11, 80.0), (10, 12, 70.0)]
EVAL = {"fvu": 0.123, "dead_frac": 0.0625}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A collated run whose every sequence holds the two hostile tokens, with a latent
    (TOPIC) whose top records pick three common tokens and last "denominator", and a
    latent (DEAD) that never fires."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("run")
    tok = make_tokenizer(root / "tok")
    tok.add_tokens([SCRIPT_TOKEN, IMG_TOKEN, "denominator"])
    tok.save_pretrained(root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[:, 3] = tok.convert_tokens_to_ids(SCRIPT_TOKEN)
    tokens[:, 9] = tok.convert_tokens_to_ids(IMG_TOKEN)
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    picks = list(dict.fromkeys(ids))[:3] + [tok.convert_tokens_to_ids("denominator")]
    for (seq, pos, act), token in zip(TOPIC_ROWS, picks):
        tokens[seq, pos] = token
        acts[seq * CTX + pos, 0] = act
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "tok")})
    torch.manual_seed(0)
    sae = TopKSAE(D, 32, 4)
    with torch.no_grad():
        sae.W_enc[:, 0] = 0  # input dim 0 reaches TOPIC only
        sae.W_enc[TOPIC] = 0
        sae.W_enc[TOPIC, 0] = 1
        sae.b_lat[TOPIC] = -10  # fires where dim 0 > 10: the TOPIC_ROWS
        sae.b_lat[DEAD] = -100
    sae.save(root / "saes/0/resid_post", extra_cfg={"eval": EVAL})
    return collate(root)


GROUP_SIZES = [8, 16, 32]  # prefixes 0.25, 0.5, 1 of 32 latents
GROUP_DEAD = 9  # rigged never to fire, in prefix group 1


@pytest.fixture(scope="module")
def group_records(tmp_path_factory):
    """A collated run of a Matryoshka SAE (prefix groups 0..7, 8..15, 16..31), latent GROUP_DEAD dead."""
    from pipeline.saes.matryoshka import MatryoshkaSAE

    root = tmp_path_factory.mktemp("groups")
    synthetic_run(root)
    torch.manual_seed(0)
    sae = MatryoshkaSAE(D, 32, 4, prefixes=[0.25, 0.5, 1.0])
    with torch.no_grad():
        sae.threshold.fill_(1.0)
        sae.b_lat[GROUP_DEAD] = -100
    assert sae.prefix_sizes == GROUP_SIZES
    sae.save(root / "saes/0/resid_post")
    return collate(root)


def synthetic_run(root, bos: bool = False):
    """A store of random activations over the corpus's tokens (each sequence opening with BOS when `bos`)."""
    tok = make_tokenizer(root / "tok")
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    if bos:
        tokens[:, 0] = tok.bos_token_id
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "tok"), **({"prepend_bos": True} if bos else {})})


def collate(root):
    """Collate layer 0 of a synthetic run; the viewer page."""
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
    synthetic_run(root, bos=True)
    torch.manual_seed(0)
    sae = TopKSAE(D, 32, 4)
    with torch.no_grad():
        sae.b_lat[0] = 6.0  # fires on every token, BOS included
    sae.save(root / "saes/0/resid_post")
    return collate(root)


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

    driver.get("about:blank")  # a fresh page: a new fragment alone would keep the last test's state
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
    feature = read_feature(folder, latent)
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
    main = browser.find_element(By.TAG_NAME, "main").text
    assert "Random positive activations" in main

    # A section per quantile interval between the top and the random records, highest first,
    # titled with its bounds and count; the intervals also shade the histogram.
    intervals = feature["quantiles"][::-1]
    sections = browser.find_elements(By.CSS_SELECTOR, "#quantiles section.quantile")
    assert intervals and len(sections) == len(intervals)
    for section, q in zip(sections, intervals):
        title = section.find_element(By.TAG_NAME, "h4").text
        lo, hi, count = re.match(r"Activations in \((\S+), (\S+)\]: (\d+)", title).groups()
        assert float(lo) == pytest.approx(q["lo"], rel=1e-3) and float(hi) == pytest.approx(q["hi"], rel=1e-3)
        assert int(count) == q["count"]
        assert len(section.find_elements(By.CLASS_NAME, "record")) == len(q["examples"]) == min(q["count"], 5)
        assert q["count"] or section.text.endswith("No activation falls in this interval.")
    assert main.index("Top activations") < main.index("Activations in (") < main.index("Random positive activations")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#hist rect.band")) == len(intervals)
    # doc_id is explained: a stored window of context_size tokens, which may span documents.
    note = browser.find_element(By.ID, "doc-note").text
    assert "doc_id" in note and f"{CTX} tokens" in note and "end of one document and the start of the next" in note
    assert "dead" not in main.lower()  # a live latent: the word is kept for never-fired latents


def test_dead_means_never_fired(records, browser):
    from selenium.webdriver.common.by import By

    feature = read_feature(records.parent, DEAD)
    assert feature["n_positive"] == 0 and feature["top"] == []
    _open(browser, records, f"#{DEAD}", str(DEAD))
    assert browser.find_element(By.ID, "top").text == "Never fired on any of the stored tokens: a dead latent."
    assert "dead" in browser.find_element(By.CSS_SELECTOR, f"#list li[data-id='{DEAD}']").text
    live = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#list li") if li.get_attribute("data-id") != str(DEAD)]
    dead_ids = {r["id"] for r in json.loads((records.parent / "index.json").read_text())["latents"] if r["density"] == 0}
    assert sum("dead" in t for t in live) == len(dead_ids - {DEAD})


def test_search_finds_a_latent_by_the_tokens_of_its_top_records(records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = records.parent
    index = json.loads((folder / "index.json").read_text())
    topic = next(r for r in index["latents"] if r["id"] == TOPIC)
    assert "denominator" not in topic["top_tokens"]  # the list's one-line hint does not show it

    def expected(q: str) -> set[int]:
        return search_hits(folder, q)

    def listed(d) -> set[int]:
        return {int(li.get_attribute("data-id")) for li in d.find_elements(By.CSS_SELECTOR, "#list li")}

    assert TOPIC in expected("denominator")
    _open(browser, records, "", "overview")
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys("Denominator")
    WebDriverWait(browser, 20).until(lambda d: listed(d) == expected("denominator"))
    search.clear()
    search.send_keys("no such token")
    WebDriverWait(browser, 20).until(lambda d: listed(d) == set())


def search_hits(folder, q: str, explanations: dict | None = None) -> set[int]:
    """What the search box must list for q (no whitespace in it), from the files: a latent whose id
    starts with q, whose list hint holds it, whose explanation text holds it, or one of whose top
    records' text holds it overlapping the picked token (any case)."""
    q = q.lower()
    index = json.loads((folder / "index.json").read_text())
    found = set()
    for r in index["latents"]:
        i = r["id"]
        hit = (q.isdigit() and str(i).startswith(q)) or q in r["top_tokens"].lower()
        hit |= explanations is not None and i in explanations and q in explanations[i]["text"].lower()
        for s in read_feature(folder, i)["top"]:
            text = "".join(s["tokens"]).lower()
            a = len("".join(s["tokens"][: s["idx"]]))
            b = a + len(s["tokens"][s["idx"]])
            hit |= any(at < b and at + len(q) > a for at in range(len(text)) if text.startswith(q, at))
        found |= {i} if hit else set()
    return found


def test_search_finds_a_word_split_across_tokens(records, browser):
    """A query spanning a token boundary at a top record's picked token ("Dep" + "recated" for
    "Deprecated") finds the latent, which no single picked token holds."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = records.parent
    index = json.loads((folder / "index.json").read_text())
    query = latent = None
    for r in index["latents"]:  # the first record whose picked token continues the token before it
        for s in read_feature(folder, r["id"])["top"]:
            before, pick = s["tokens"][s["idx"] - 1] if s["idx"] else "", s["tokens"][s["idx"]]
            if before[-2:].isalpha() and len(before) >= 2 and pick[:2].isalpha() and len(pick) >= 2:
                query, latent = (before[-2:] + pick[:2]).upper(), r["id"]  # any case matches
                break
        if query:
            break
    assert query, "the corpus must split some word at a picked token"
    picks = [s["tokens"][s["idx"]].lower() for s in read_feature(folder, latent)["top"]]
    assert not any(query.lower() in t for t in picks)  # the picked-token search of before missed it
    want = search_hits(folder, query)
    assert latent in want

    _open(browser, records, "", "overview")
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys(query)
    WebDriverWait(browser, 20).until(
        lambda d: {int(li.get_attribute("data-id")) for li in d.find_elements(By.CSS_SELECTOR, "#list li")} == want)


def test_sidebar_scrolls_to_the_shown_latent(records, browser):
    from selenium.webdriver.common.by import By

    last = len(json.loads((records.parent / "index.json").read_text())["latents"]) - 1
    _open(browser, records, f"#{last}", str(last))
    li = browser.find_element(By.CSS_SELECTOR, f"#list li[data-id='{last}']")
    assert "on" in li.get_attribute("class").split()
    box = browser.find_element(By.ID, "list")
    assert browser.execute_script("return arguments[0].scrollHeight > arguments[0].clientHeight", box), \
        "the list must be taller than its box for this test to mean anything"
    inside = """const b = arguments[0].getBoundingClientRect(), r = arguments[1].getBoundingClientRect();
                return r.top >= b.top - 1 && r.bottom <= b.bottom + 1;  // 1px: layout rounds sub-pixels"""
    assert browser.execute_script(inside, box, li)


def test_index_page_links_each_layer_with_its_numbers(records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = records.parents[2] / "index.html"
    summary = json.loads((records.parent / "summary.json").read_text())
    browser.get(page.resolve().as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr")
    cells = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
    assert len(rows) == 1 and cells == ["0", "resid_post", "viewer", str(summary["n_latents"]), str(summary["dead"]),
                                         str(summary["ultra_rare"]), f"{summary['n_tokens']:,}", "0.123 (raw)", "–",
                                         "6.25%", "–", "density"]
    assert summary["dead"] >= 1  # DEAD

    # The link opens the layer's viewer from disk, and the viewer links back.
    rows[0].find_element(By.LINK_TEXT, "viewer").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == "overview")
    assert browser.current_url == records.resolve().as_uri()
    browser.find_element(By.LINK_TEXT, "all layers").click()
    WebDriverWait(browser, 20).until(lambda d: d.title == "saepipe records")


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
    # The first text search loads search.js and draws the list again: read it once that is done.
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return state.searchState") == "ready")
    ids = browser.execute_script("return [...document.querySelectorAll('#list li')].map((li) => +li.dataset.id)")

    def top_tokens(i):
        feature = read_feature(records.parent, i)
        return [r["tokens"][r["idx"]].lower() for r in feature["top"]]

    assert 17 in ids and all(str(i).startswith("17") or any("17" in t for t in top_tokens(i)) for i in ids)

    browser.find_element(By.CSS_SELECTOR, "#list li[data-id='17']").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == "17")
    assert browser.find_element(By.ID, "feature-title").text.startswith("Latent 17")


def test_excluded_bos_is_unshaded_and_left_out_of_the_colour_scale(bos_records, browser):
    from selenium.webdriver.common.by import By

    folder = bos_records.parent
    assert json.loads((folder / "summary.json").read_text())["excluded_positions"] == [0]
    feature = read_feature(folder, 0)
    first = feature["top"][0]
    assert first["window_start"] == 0 and first["acts"][0] == 0.0 and first["acts"][first["idx"]] == first["act"]

    # Even a record that carries a value there (records from an older saepipe) must not
    # shade BOS or scale the other tokens by it: plant a huge one in the shard file, where a
    # record keeps its acts as [w, idx, positions, values] (pipeline.viewer).
    shard = folder / "viewer_data/features_0.js"
    prefix = "saeViewer.shard(0, ["
    text = shard.read_text()
    body = json.loads("[" + text[len(prefix): text.rindex("]")] + "]")
    stored = body[0]["top"][0]
    assert 0 not in stored[2]
    stored[2].insert(0, 0)
    stored[3].insert(0, 1000.0)
    shard.write_text(prefix + "\n" + ",\n".join(json.dumps(f) for f in body) + "\n]);\n")
    assert read_feature(folder, 0)["top"][0]["acts"] == [1000.0] + first["acts"][1:]

    _open(browser, bos_records, "#0", "0")
    spans = browser.find_element(By.ID, "top").find_element(By.CLASS_NAME, "record").find_elements(By.CLASS_NAME, "tok")
    colour = "return getComputedStyle(arguments[0]).backgroundColor"
    bos = spans[0]
    assert browser.execute_script(colour, bos) == "rgba(0, 0, 0, 0)"  # unshaded
    assert bos.get_attribute("data-excluded") == "1" and float(bos.get_attribute("data-act")) == 0
    assert "excluded" in bos.get_attribute("title")
    # The picked token holds the latent's largest act shown: full colour, not scaled by 1000.
    assert browser.execute_script(colour, spans[first["idx"]]) == "rgb(234, 88, 12)"


EMOJI = "\N{GRINNING FACE}"


@pytest.fixture(scope="module")
def emoji_records(tmp_path_factory):
    """A collated run whose every third sequence holds an emoji, its bytes spread over tokens, so
    those windows read in context (their own strings in the windows files), beside plain ones."""
    root = tmp_path_factory.mktemp("emoji")
    tok = make_tokenizer(root / "tok")
    emoji = tok.encode(" " + EMOJI, add_special_tokens=False)
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    tokens[::3, 4: 4 + len(emoji)] = emoji
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "tok")})
    torch.manual_seed(0)
    TopKSAE(D, 32, 4).save(root / "saes/0/resid_post")
    return collate(root)


def test_every_record_is_drawn_as_read_feature_gives_it(emoji_records, browser):
    """The page makes the stored compact records whole as read_feature does: each record of a
    latent (top, every interval's, random) shows its window's tokens, each with its act and id."""
    from selenium.webdriver.common.by import By

    folder = emoji_records.parent
    index = json.loads((folder / "index.json").read_text())
    latent = max(index["latents"], key=lambda r: r["density"])["id"]
    f = read_feature(folder, latent)
    shown = f["top"] + [s for q in reversed(f["quantiles"]) for s in q["examples"]] + f["random"]
    assert any(EMOJI in s["tokens"] for s in shown) and any(EMOJI not in "".join(s["tokens"]) for s in shown)

    _open(browser, emoji_records, f"#{latent}", str(latent))
    drawn = browser.execute_script("""
        return ["top", "quantiles", "random"].flatMap((id) =>
          [...document.getElementById(id).querySelectorAll(".record")].map((rec) =>
            [...rec.querySelectorAll(".tok")].map((s) => [s.textContent, +s.dataset.act, s.title])));""")
    assert len(drawn) == len(shown)
    for s, spans in zip(shown, drawn):
        assert [t for t, _, _ in spans] == [t.replace("\n", "\u21b5\n") for t in s["tokens"]]
        assert [a for _, a, _ in spans] == s["acts"]
        assert all(title.endswith(f"(token {i})") for (_, _, title), i in zip(spans, s["token_ints"]))


@pytest.fixture(scope="module")
def lens_records(tmp_path_factory):
    """A collated run whose store names a tiny Llama: its latents carry a logit lens."""
    from helpers import make_model

    root = tmp_path_factory.mktemp("lens")
    from transformers import AutoTokenizer

    make_model("llama", root / "llama", n_layers=2, d_model=D)
    tok = AutoTokenizer.from_pretrained(root / "llama")
    ids = tok.encode(" ".join(CORPUS * 4), add_special_tokens=False)[: N_SEQ * CTX]
    tokens = np.array(ids, dtype=np.int32).reshape(N_SEQ, CTX)
    acts = torch.randn(N_SEQ * CTX, D, generator=torch.Generator().manual_seed(0))
    write_synthetic(root, acts, tokens, attrs={"tokenizer": str(root / "llama"), "model": str(root / "llama"),
                                               "revision": "main"})
    torch.manual_seed(0)
    TopKSAE(D, 32, 4).save(root / "saes/0/resid_post")
    return collate(root)


def test_latent_page_shows_the_logit_lens(lens_records, bos_records, browser):
    from selenium.webdriver.common.by import By

    feature = read_feature(lens_records.parent, 3)
    _open(browser, lens_records, "#3", "3")
    up, down = browser.find_elements(By.CSS_SELECTOR, "#lens table")
    for table, tokens, logits in ((up, feature["top_upvote_tokens_logits"], feature["top_upvotes_logits"]),
                                  (down, feature["top_downvote_tokens_logits"], feature["top_downvotes_logits"])):
        cells = [c.get_attribute("textContent") for c in table.find_elements(By.CSS_SELECTOR, "td.t")]
        assert cells == [json.dumps(t, ensure_ascii=False)[1:-1] for t in tokens]
        shown = [float(c.text) for c in table.find_elements(By.CSS_SELECTOR, "td:not(.t)")]
        assert shown == pytest.approx(logits, rel=1e-2)
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#lens th")] == ["promotes", "logit",
                                                                                    "suppresses", "logit"]
    assert "final norm and unembedding" in browser.find_element(By.ID, "lens-note").text
    # The same lists as bars: one per token, its length the logit's size.
    for side, logits in (("up", feature["top_upvotes_logits"]), ("down", feature["top_downvotes_logits"])):
        bars = browser.find_elements(By.CSS_SELECTOR, f"#lens-chart rect.{side}")
        widths = [float(r.get_attribute("width")) for r in bars]
        assert len(widths) == len(logits) and widths == sorted(widths, reverse=True)
    # A store that names no model has no lens, and says why.
    _open(browser, bos_records, "#0", "0")
    assert browser.find_elements(By.CSS_SELECTOR, "#lens table") == []
    assert not browser.find_element(By.ID, "lens-chart").is_displayed()
    assert "Not computed" in browser.find_element(By.ID, "lens-note").text


@pytest.fixture(scope="module")
def explained(lens_records, tmp_path_factory):
    """A copy of the lens run after `saepipe explain` (its tiny Llama's forwards; the synthetic
    store's activations are not the model's, so the scores are whatever they come out as):
    (viewer page, explanations by latent, explain_summary.json)."""
    from pipeline.collate import explain

    root = tmp_path_factory.mktemp("explained") / "run"
    shutil.copytree(lens_records.parents[3], root)
    llama = lens_records.parents[3] / "llama"  # the store names this folder: explain checks it
    explain.run(config_from_dict({
        "run_dir": str(root), "model": {"name": str(llama), "device": "cpu"}, "data": {"path": "synthetic"},
        "harvest": {"layers": [0], "n_tokens": N_SEQ * CTX, "context_size": CTX},
        "explain": {"n_score_windows": 4, "n_select_windows": 4, "chunk_windows": 4, "batch_tokens": 512, "device": "cpu"},
    }))
    folder = root / "records/0/resid_post"
    return (folder / "viewer.html", explain.read_explanations(folder),
            json.loads((folder / explain.SUMMARY).read_text()))


def _f1(e) -> float | None:
    return e["scores"]["f1"] if e else None


def test_latent_page_shows_its_explanation_beside_the_baseline(explained, browser):
    from selenium.webdriver.common.by import By

    page, ex, _ = explained
    i = next(i for i, e in sorted(ex.items()) if e["patterns"] and _f1(e) is not None)
    e = ex[i]
    _open(browser, page, f"#{i}", str(i))
    box = browser.find_element(By.ID, "explanation")
    assert box.is_displayed() and e["text"] in browser.find_element(By.ID, "explain-text").text
    shown = browser.find_elements(By.CSS_SELECTOR, "#explain-patterns li")
    assert len(shown) == len(e["patterns"])
    for li, p in zip(shown, e["patterns"]):
        assert [s.get_attribute("textContent") for s in li.find_elements(By.CLASS_NAME, "pat")] == \
            [t if j < 0 else json.dumps(t, ensure_ascii=False)[1:-1] for t, j in zip(p["tokens"], p["ids"])]
        assert float(re.search(r"mean act (\S+)", li.text).group(1)) == pytest.approx(p["activation"], rel=1e-2)
    for key in ("precision", "recall", "f1", "corr"):
        cells = browser.find_element(By.CSS_SELECTOR, f"#explain-scores tr[data-score='{key}']").text.split()
        for got, want in zip(cells[-2:], (e["scores"][key], e["baseline"]["scores"][key])):
            assert (got == "–") if want is None else float(got) == pytest.approx(want, rel=1e-2, abs=1e-3), key
    assert "F1" in box.text and "baseline" in box.text
    assert f"patterns cut to {e['depth']} element" in browser.find_element(By.ID, "explain-note").text


def test_list_sorts_and_filters_by_f1_and_searches_explanations(explained, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page, ex, _ = explained
    n = len(json.loads((page.parent / "index.json").read_text())["latents"])

    def listed(d) -> list[int]:
        return [int(li.get_attribute("data-id")) for li in d.find_elements(By.CSS_SELECTOR, "#list li")]

    _open(browser, page, "", "overview")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "f1-filter").is_displayed())
    Select(browser.find_element(By.ID, "sort")).select_by_value("f1-desc")
    f1 = {i: _f1(ex.get(i)) for i in range(n)}
    want = sorted(range(n), key=lambda i: (-(f1[i] if f1[i] is not None else -1), i))
    assert len({v for v in f1.values() if v is not None}) >= 2, "the run must give a few distinct F1s"
    WebDriverWait(browser, 20).until(lambda d: listed(d) == want)

    scored = [v for v in f1.values() if v is not None]
    bar = round((min(scored) + max(scored)) / 2, 3)
    browser.find_element(By.ID, "f1-min").send_keys(str(bar))
    kept = [i for i in want if f1[i] is not None and f1[i] >= bar]
    WebDriverWait(browser, 20).until(lambda d: listed(d) == kept)
    assert 0 < len(kept) < n and f"with explanation F1 ≥ {bar}" in browser.find_element(By.ID, "count").text
    browser.find_element(By.ID, "f1-min").clear()
    WebDriverWait(browser, 20).until(lambda d: listed(d) == want)

    # The search box matches explanation text too: a word some latent is found by only through it.
    words = dict.fromkeys(t.strip() for e in ex.values() for p in e["patterns"] for t, j in zip(p["tokens"], p["ids"])
                          if j >= 0 and len(t.strip()) >= 3 and t.strip().isalpha())
    word = next(w for w in words if search_hits(page.parent, w, ex) != search_hits(page.parent, w))
    browser.find_element(By.ID, "search").send_keys(word)
    WebDriverWait(browser, 20).until(lambda d: set(listed(d)) == search_hits(page.parent, word, ex))


def test_explain_numbers_reach_the_overview_and_the_index_page(explained, records, browser):
    from selenium.webdriver.common.by import By

    page, _, summary = explained
    _open(browser, page, "", "overview")
    rows = {tr.get_attribute("data-side"): tr.text.split()[1:]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#explain-dist tr[data-side]")}
    for side in ("n2g", "baseline"):
        d = summary[side]
        for got, want in zip(rows[side], [d["mean_f1"], d["q1_f1"], d["median_f1"], d["q3_f1"], d["mean_corr"]]):
            assert (got == "–") if want is None else float(got) == pytest.approx(want, rel=1e-2, abs=1e-3)

    browser.get((page.parents[2] / "index.html").resolve().as_uri())
    head = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#layers thead th")]
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr td")]
    assert head[-2:] == ["N2G mean F1", "baseline mean F1"]
    assert cells[-2:] == [f"{summary['n2g']['mean_f1']:.3g}", f"{summary['baseline']['mean_f1']:.3g}"]

    # Records without explanations: no explanation part, no F1 controls, no F1 columns.
    _open(browser, records, f"#{TOPIC}", str(TOPIC))
    assert not browser.find_element(By.ID, "explanation").is_displayed()
    assert not browser.find_element(By.ID, "f1-filter").is_displayed()
    assert browser.execute_script("return document.querySelector('#sort option[value=\"f1-desc\"]').hidden")
    assert not browser.find_element(By.ID, "overview-explain").is_displayed()
    browser.get((records.parents[2] / "index.html").resolve().as_uri())
    assert "F1" not in browser.find_element(By.ID, "layers").text


def test_related_latents_link_to_their_pages(records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    f = read_feature(records.parent, TOPIC)
    _open(browser, records, f"#{TOPIC}", str(TOPIC))
    for box, key in (("neighbors", "decoder_neighbors"), ("cooccurring", "cooccurring")):
        links = browser.find_elements(By.CSS_SELECTOR, f"#{box} a")
        assert [a.text for a in links] == [f"#{r['id']}" for r in f[key]]
    assert len(f["decoder_neighbors"]) == 5
    nearest = f["decoder_neighbors"][0]["id"]
    browser.find_element(By.CSS_SELECTOR, "#neighbors a").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == str(nearest))
    assert browser.find_element(By.ID, "feature-title").text.startswith(f"Latent {nearest}")
    # TOPIC fires on 4 tokens only: its partners are the latents firing there too.
    partner = f["cooccurring"][0]
    assert partner["count"] <= 4 and f["cooccurring"] == sorted(f["cooccurring"], key=lambda r: -r["jaccard"])
    _open(browser, records, f"#{TOPIC}", str(TOPIC))
    browser.find_element(By.CSS_SELECTOR, "#cooccurring a").click()
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.body.dataset.shown") == str(partner["id"]))


def test_lens_notes_say_when_the_lens_is_uninformative(lens_records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.viewer import read_features

    flags = [f["lens_uninformative"] for f in read_features(lens_records.parent)]
    for i in (flags.index(True) if True in flags else None, flags.index(False) if False in flags else None):
        if i is None:
            continue
        _open(browser, lens_records, f"#{i}", str(i))
        note = browser.find_element(By.ID, "lens-quality")
        assert note.is_displayed() == flags[i]
        assert ("lens uninformative" in note.text) == flags[i]
    # A layer in the model's lower third says so, whatever the latent.
    i = flags.index(False) if False in flags else 0
    _open(browser, lens_records, f"#{i}", str(i))
    browser.execute_script("state.summary.lens_quality.lower_third = true; document.body.dataset.shown = ''; route();")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.shown") == str(i))
    assert "lower third of the model's 2 blocks" in browser.find_element(By.ID, "lens-quality").text


def test_overview_shows_the_eval_of_the_sae_there_now(records, browser, tmp_path):
    """saepipe eval's numbers reach the layer's overview page through viewer_data/eval.js, for the
    weights they were measured on only."""
    import shutil

    from selenium.webdriver.common.by import By

    from pipeline.saes import saved_marker
    from pipeline.viewer import write_index_page

    root = tmp_path / "run"
    shutil.copytree(records.parents[3], root)
    page = root / "records/0/resid_post/viewer.html"
    sae = root / "saes/0/resid_post"
    lm = {"ce_clean": 3.25, "ce_spliced": 3.5, "ce_zero": 9.0, "delta_ce": 0.25, "ce_recovered": 0.9565,
          "kl": 0.125, "fvu": 0.1, "l0": 4.0, "dead_frac": 0.0, "n_tokens": 4096}
    (sae / "eval.json").write_text(json.dumps({**lm, "sae_sha256": saved_marker(sae)["sha256"]}))
    write_index_page(root)
    _open(browser, page, "", "overview")
    text = browser.find_element(By.ID, "overview-stats").text
    assert "3.25 → 3.5" in text and "ΔCE (spliced − clean) 0.25" in text, text
    # each FVU and dead share names its space and its tokens: eval's, and train's from cfg.json
    assert "FVU raw, eval (4096 held-out tokens past the store) 0.1" in text, text
    assert "dead, eval (never fired on those 4096 tokens) 0.00%" in text, text
    assert f"FVU raw, train's held-out store tokens {EVAL['fvu']}" in text, text
    assert "dead, train's held-out store tokens 6.25%" in text, text
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#pictures a")}
    assert set(links) == {"density picture"}  # this SAE was saved by hand: no loss.png to link
    assert links["density picture"].endswith("/records/0/resid_post/density.png")

    # An eval of other weights is not shown.
    (sae / "eval.json").write_text(json.dumps({**lm, "sae_sha256": "0" * 64}))
    write_index_page(root)
    _open(browser, page, "", "overview")
    assert "ΔCE" not in browser.find_element(By.ID, "overview-stats").text


def test_latent_page_names_its_prefix_group_and_the_list_filters_by_group(group_records, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def group(i):  # from the prefix sizes, not from the records
        return sum(i >= m for m in GROUP_SIZES[:-1])

    starts = [0] + GROUP_SIZES[:-1]
    for i in (0, 7, 8, GROUP_DEAD, 15, 16, 31):
        _open(browser, group_records, f"#{i}", str(i))
        g = group(i)
        line = browser.find_element(By.ID, "feature-group")
        assert line.is_displayed() and line.text == f"prefix group {g} (latents {starts[g]}..{GROUP_SIZES[g] - 1})"

    def listed(d):
        return [int(li.get_attribute("data-id")) for li in d.find_elements(By.CSS_SELECTOR, "#list li")]

    _open(browser, group_records, "", "overview")
    assert browser.find_element(By.ID, "group-filter").is_displayed()
    pick = Select(browser.find_element(By.ID, "group"))
    assert [o.get_attribute("value") for o in pick.options] == ["", "0", "1", "2"]
    for g in range(3):
        pick.select_by_value(str(g))
        want = list(range(starts[g], GROUP_SIZES[g]))
        WebDriverWait(browser, 20).until(lambda d: listed(d) == want)
        assert browser.find_element(By.ID, "count").text == f"{len(want)} of 32 latents in prefix group {g}"
    # The filter and the search narrow the list together.
    browser.find_element(By.ID, "search").send_keys("1")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return state.searchState") == "ready")
    assert 16 in listed(browser) and set(listed(browser)) <= set(range(16, 32)) and 1 not in listed(browser)
    browser.find_element(By.ID, "search").clear()
    pick.select_by_value("")
    WebDriverWait(browser, 20).until(lambda d: listed(d) == list(range(32)))


def test_overview_and_index_page_count_live_and_dead_latents_per_group(group_records, browser):
    from selenium.webdriver.common.by import By

    from pipeline.viewer import read_features

    folder = group_records.parent
    positive = [f["n_positive"] for f in read_features(folder)]
    assert positive[GROUP_DEAD] == 0
    starts = [0] + GROUP_SIZES[:-1]
    counts = []  # (live, dead) per group, from the records
    for a, b in zip(starts, GROUP_SIZES):
        live = sum(c > 0 for c in positive[a:b])
        counts.append((live, b - a - live))
    assert all(live > 0 for live, _ in counts) and counts[1][1] >= 1

    _open(browser, group_records, "", "overview")
    assert browser.find_element(By.ID, "overview-groups").is_displayed()
    rows = [tr.text for tr in browser.find_elements(By.CSS_SELECTOR, "#group-stats tr")]
    assert rows == [f"prefix group {g} (latents {a}..{b - 1}) {live} live, {dead} dead"
                    for g, (a, b, (live, dead)) in enumerate(zip(starts, GROUP_SIZES, counts))]
    assert "per prefix group" in browser.find_element(By.ID, "overview-groups-title").text

    browser.get((group_records.parents[2] / "index.html").resolve().as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#groups tbody tr")
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in rows]
    assert cells == [["0", "resid_post", f"prefix group {g}", f"{a}..{b - 1}", str(live), str(dead)]
                     for g, (a, b, (live, dead)) in enumerate(zip(starts, GROUP_SIZES, counts))]


def test_an_sae_without_groups_shows_none(records, browser):
    from selenium.webdriver.common.by import By

    assert "latent_groups" not in json.loads((records.parent / "summary.json").read_text())
    _open(browser, records, "", "overview")
    assert not browser.find_element(By.ID, "group-filter").is_displayed()
    assert not browser.find_element(By.ID, "overview-groups").is_displayed()
    assert "group" not in browser.find_element(By.TAG_NAME, "aside").text
    _open(browser, records, f"#{TOPIC}", str(TOPIC))
    assert not browser.find_element(By.ID, "feature-group").is_displayed()
    assert "group" not in browser.find_element(By.TAG_NAME, "main").text
    browser.get((records.parents[2] / "index.html").resolve().as_uri())
    assert browser.find_elements(By.ID, "groups") == []
