"""`saepipe export --format neuronpedia`: Neuronpedia's upload batches from a collated and
explained run. Every file written validates against pipeline/neuronpedia.schema.json and the
route's two extra rules; the numbers are the records'; batches of 128; bad inputs refused in
one line with nothing written; the schema refuses what the route refuses."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from helpers import harvest_config, make_model, run_cli, write_corpus
from pipeline import collate, neuronpedia, viewer
from pipeline.collate import explain
from pipeline.config import config_from_dict
from pipeline.paths import DONE
from pipeline.saes import saved_marker
from pipeline.saes.topk import TopKSAE
from stages.cli import main

N_SEQ, CTX, N_LAT, DEAD = 48, 16, 16, 15
VALIDATOR = jsonschema.Draft202012Validator(neuronpedia.schema())


def export(sae_dir, out, *args):
    result = CliRunner().invoke(main, ["export", str(sae_dir), "--format", "neuronpedia", "--out", str(out), *args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *words: str):
    assert code == 2, output
    assert output.startswith("saepipe: error: ") and output.count("\n") == 1, output
    for w in words:
        assert w in output, output


def validated(out: Path) -> tuple[dict, list[dict]]:
    """(manifest, batch bodies) of an export folder, every batch checked against the schema and
    the route's own rules, and nothing else in the folder."""
    manifest = json.loads((out / neuronpedia.MANIFEST).read_text())
    names = [b["file"] for b in manifest["batches"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [neuronpedia.MANIFEST])
    assert names == [f"batch-{j}.json" for j in range(len(names))]
    bodies = []
    for b in manifest["batches"]:
        body = json.loads((out / b["file"]).read_text())
        VALIDATOR.validate(body)
        neuronpedia.check_batch(body)
        assert len(body["features"]) == b["n_features"]
        assert (body["features"][0]["index"], body["features"][-1]["index"]) == (b["first_index"], b["last_index"])
        assert (body["modelId"], body["source"]) == (manifest["modelId"], manifest["source"])
        bodies.append(body)
    return manifest, bodies


def expected_activations(record: dict) -> list[dict]:
    """What the module docstring promises, written out again from the record."""
    n = record["n_positive"]
    acts = [r["act"] for r in record["top"]]
    want = [{"tokens": r["tokens"], "values": r["acts"], "quantileMax": max(acts), "quantileMin": min(acts),
             "quantileFraction": len(acts) / n} for r in record["top"]]
    for q in record["quantiles"]:
        want += [{"tokens": r["tokens"], "values": r["acts"], "quantileMax": q["hi"], "quantileMin": q["lo"],
                  "quantileFraction": q["count"] / n} for r in q["examples"]]
    return [{**a, "tokens": [t or "\ufffd" for t in a["tokens"]]} for a in want]


# --------------------------------------------------------------------------- a real collated, explained run
@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A tiny Llama harvested at layer 0, a random TopK SAE on it (latent DEAD never fires),
    collated (with the logit lens) and explained: (root, raw config)."""
    root = tmp_path_factory.mktemp("neuronpedia")
    make_model("llama", root / "model", n_layers=2, d_model=32)
    write_corpus(root / "corpus.jsonl")
    raw = harvest_config(root / "model", root / "corpus.jsonl", root / "run", n_tokens=N_SEQ * CTX, layers=[0])
    raw["collate"] = {"n_top": 6, "n_random": 2, "n_quantiles": 3, "n_per_quantile": 2, "batch_size": 256,
                      "device": "cpu"}
    raw["explain"] = {"n_score_windows": 8, "n_select_windows": 8, "chunk_windows": 16, "batch_tokens": 1024, "device": "cpu"}
    assert run_cli(root, raw, "harvest").exit_code == 0
    torch.manual_seed(0)
    sae = TopKSAE(32, N_LAT, 4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N_LAT, 32))
        sae.b_lat.zero_()
        sae.b_lat[DEAD] = -1e6
    sae.save(root / "run" / "saes" / "0" / "resid_post")
    collate.run(config_from_dict(raw))
    explain.run(config_from_dict(raw))
    return root, raw


@pytest.fixture
def run(explained, tmp_path):
    """A copy of the explained run for one test to change: its SAE folder and its records folder."""
    root, _ = explained
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run" / "saes" / "0" / "resid_post", tmp_path / "run" / "records" / "0" / "resid_post"


def test_batches_hold_the_records_and_validate(explained, tmp_path):
    root, _ = explained
    sae, records = root / "run" / "saes" / "0" / "resid_post", root / "run" / "records" / "0" / "resid_post"
    code, output = export(sae, tmp_path / "np")
    assert code == 0, output
    assert "15 of 16 latents" in output and "modelId model, source 0-saepipe-resid_post" in output
    manifest, bodies = validated(tmp_path / "np")
    # The model's folder is named `model`; the hook gives the set name.
    assert (manifest["modelId"], manifest["source"], manifest["setName"]) == \
        ("model", "0-saepipe-resid_post", "saepipe-resid_post")
    assert manifest["left_out"]["latents"] == [DEAD] and manifest["n_latents"] == N_LAT

    features = {f["index"]: f for body in bodies for f in body["features"]}
    assert sorted(features) == [i for i in range(N_LAT) if i != DEAD]
    explanations = explain.read_explanations(records)
    checked_logits = 0
    for i, f in features.items():
        record = viewer.read_feature(records, i)
        assert f["density"] == record["density"]
        assert f["activations"] == expected_activations(record)
        assert len(f["activations"]) >= len(record["top"]) > 0
        if "top_upvote_tokens_logits" in record:
            checked_logits += 1
            assert [(x["token"], x["value"]) for x in f["topLogits"]] == \
                list(zip(record["top_upvote_tokens_logits"], record["top_upvotes_logits"]))
            assert [(x["token"], x["value"]) for x in f["bottomLogits"]] == \
                list(zip(record["top_downvote_tokens_logits"], record["top_downvotes_logits"]))
        text = explanations[i]["text"]
        assert f["explanations"] == ([{"text": text, "methodName": "n2g", "modelName": None}] if text else [])
        assert (not text) == (i in manifest["no_explanation"]["latents"])
    assert checked_logits == len(features), "collate had the model: every live latent carries its lens"
    # Spot check one latent by hand, against the records' own strings.
    first = min(features)
    record = viewer.read_feature(records, first)
    top = features[first]["activations"][0]
    assert top["tokens"] == record["top"][0]["tokens"] and top["values"] == record["top"][0]["acts"]
    assert top["quantileMax"] == record["max_act"]


def test_names_are_taken_from_the_options(explained, tmp_path):
    root, _ = explained
    code, output = export(root / "run" / "saes" / "0" / "resid_post", tmp_path / "np",
                          "--np-model-id", "Tiny-Llama", "--np-set-name", "res-me")
    assert code == 0, output
    manifest, bodies = validated(tmp_path / "np")
    assert (manifest["modelId"], manifest["source"]) == ("tiny-llama", "0-res-me")  # lowercased, as Neuronpedia does
    assert {(b["modelId"], b["source"]) for b in bodies} == {("tiny-llama", "0-res-me")}


# --------------------------------------------------------------------------- a synthetic records folder
def _record(doc: int, tokens: list[str], acts: list[float]) -> dict:
    peak = max(range(len(acts)), key=acts.__getitem__)
    return {"doc_id": doc, "idx": peak, "act": acts[peak], "acts": acts, "tokens": tokens,
            "token_ints": list(range(len(tokens))), "window_start": 0}


def _feature(i: int, n_tokens: int = 4) -> dict:
    if i % 7 == 3:  # dead: no records
        return {"index": i, "density": 0.0, "n_positive": 0, "max_act": 0.0, "top": [], "random": [],
                "quantiles": []}
    tok = [f"t{i}", " a", "", "b"][:n_tokens] + [" x"] * max(0, n_tokens - 4)
    top = [_record(d, tok, [0.0, 2.5 + i / 1000, 0.5, 0.25][:n_tokens] + [0.0] * max(0, n_tokens - 4))
           for d in range(2)]
    low = _record(9, tok, [0.0, 0.75, 0.0, 0.0][:n_tokens] + [0.0] * max(0, n_tokens - 4))
    return {"index": i, "density": 0.125, "n_positive": 40, "max_act": top[0]["act"], "top": top, "random": [low],
            "quantiles": [{"lo": 0.0, "hi": 1.4, "count": 30, "examples": [low]},
                          {"lo": 1.4, "hi": 2.8, "count": 10, "examples": []}],
            "top_upvote_tokens_logits": [f"u{k}" for k in range(10)], "top_upvotes_logits": [1.5] * 10,
            "top_downvote_tokens_logits": [f"d{k}" for k in range(9)] + [""], "top_downvotes_logits": [-1.0] * 10}


def _explanation(i: int) -> dict:
    if i % 11 == 5:  # N2G found nothing
        return {"latent": i, "patterns": [], "text": ""}
    patterns = [{"tokens": ["*", f" p{i}"]}, {"tokens": ["^", "x" * 300]}, {"tokens": [" y" * 150]}] if i == 0 \
        else [{"tokens": ["*", f" p{i}"]}]
    return {"latent": i, "patterns": patterns, "text": " | ".join(explain.render(p["tokens"]) for p in patterns)}


def synthetic(root: Path, n_latents: int, feature=_feature, window=None) -> Path:
    """A run folder with a saved SAE (layer 2, resid_post) and hand-made records and explanations
    whose fingerprints match it; returns the SAE folder."""
    sae_folder = root / "run" / "saes" / "2" / "resid_post"
    TopKSAE(8, n_latents, 2).save(sae_folder, {"model": "HuggingFaceTB/SmolLM2-135M", "layer": 2,
                                               "hook": "resid_post"})
    records = root / "run" / "records" / "2" / "resid_post"
    writer = viewer.ViewerWriter(records, lambda path, text: Path(path).write_text(text))
    for i in range(n_latents):
        writer.add(i, json.dumps(feature(i)), [])
    writer.finish({"latents": []}, {})
    (records / DONE).write_text(json.dumps({"layer": 2, "hook": "resid_post", "fingerprint": {
        "sae.sha256": saved_marker(sae_folder)["sha256"], "collate.window": window}}))
    explained = {"format": 1, "fingerprint": {"records.done.sha256": explain.records_sha256(records),
                                              "model.name": "/somewhere/else"},
                 "latents": [_explanation(i) for i in range(n_latents) if feature(i)["top"]]}
    (records / explain.FILE).write_text(json.dumps(explained))
    return sae_folder


def test_300_latents_go_in_batches_of_128(tmp_path):
    sae = synthetic(tmp_path, 300)
    code, output = export(sae, tmp_path / "np")
    assert code == 0, output
    manifest, bodies = validated(tmp_path / "np")
    dead = [i for i in range(300) if i % 7 == 3]
    assert manifest["left_out"]["latents"] == dead
    assert [len(b["features"]) for b in bodies] == [128, 128, 300 - len(dead) - 256]
    assert [f["index"] for b in bodies for f in b["features"]] == [i for i in range(300) if i not in dead]
    assert manifest["modelId"] == "smollm2-135m" and manifest["source"] == "2-saepipe-resid_post"
    f0 = bodies[0]["features"][0]
    assert f0["activations"] == expected_activations(_feature(0))
    # An empty token string (part of a character) goes up as U+FFFD; each one is counted.
    assert f0["activations"][0]["tokens"] == ["t0", " a", "\ufffd", "b"] and f0["bottomLogits"][-1]["token"] == "\ufffd"
    live = 300 - len(dead)
    assert manifest["empty_tokens_replaced"]["count"] == live * (3 + 1)  # 3 records and 1 logit per latent
    # Latent 0's N2G text is over 512 characters: split between its patterns, nothing cut.
    texts = [e["text"] for e in f0["explanations"]]
    assert len(texts) == 2 and all(len(t) <= 512 for t in texts)
    assert " | ".join(texts) == _explanation(0)["text"] and manifest["split_explanations"]["latents"] == [0]
    no_text = [i for i in range(300) if i % 11 == 5 and i not in dead]
    assert manifest["no_explanation"]["latents"] == no_text
    assert all(f["explanations"] == [] for b in bodies for f in b["features"] if f["index"] in no_text)


def test_batching_function():
    items = [{"index": i} for i in range(257)]
    assert [len(b) for b in neuronpedia.batches(items)] == [128, 128, 1]
    assert [len(b) for b in neuronpedia.batches(items[:128])] == [128]
    assert list(neuronpedia.batches([])) == []
    with pytest.raises(ValueError):
        list(neuronpedia.batches(items, 129))


# --------------------------------------------------------------------------- refusals: one line, nothing written
def test_refusals(run, tmp_path):
    sae, records = run
    out = tmp_path / "np"

    shutil.move(records / explain.FILE, tmp_path / "kept.json")
    one_line_error(*export(sae, out), "no explanations", "saepipe explain CONFIG --layers 0")
    assert not out.exists()
    shutil.move(tmp_path / "kept.json", records / explain.FILE)

    # Explanations of other records (a collate since): refused, not mixed.
    done = json.loads((records / DONE).read_text())
    (records / DONE).write_text(json.dumps({**done, "n_tokens": done["n_tokens"] + 1}))
    one_line_error(*export(sae, out), "other records", "saepipe explain")
    (records / DONE).write_text(json.dumps(done))

    # Records of weights the SAE no longer has (retrained since collate).
    kept = tmp_path / "sae-kept"
    shutil.copytree(sae, kept)
    TopKSAE(32, N_LAT, 4).save(sae)
    one_line_error(*export(sae, out), "other weights", "saepipe collate CONFIG --layers 0")
    shutil.rmtree(sae)
    shutil.copytree(kept, sae)

    shutil.rmtree(records)
    one_line_error(*export(sae, out), "no records for layer 0 hook resid_post", "saepipe collate CONFIG --layers 0")
    assert not out.exists()

    out.mkdir()
    (out / "something").write_text("x")
    one_line_error(*export(sae, out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["something"]

    one_line_error(*export(sae, tmp_path / "np2", "--np-set-name", "a__b"), "--np-set-name", "__")
    one_line_error(*export(sae, tmp_path / "np2", "--np-model-id", "a/b"), "--np-model-id")
    one_line_error(*export(tmp_path / "somewhere" / "resid_post", tmp_path / "np2"), "not a run's SAE folder")
    weights = CliRunner().invoke(main, ["export", str(sae), "--format", "saelens", "--out", str(tmp_path / "np2"),
                                        "--np-set-name", "x"])
    one_line_error(weights.exit_code, weights.output, "--format neuronpedia")
    assert not (tmp_path / "np2").exists()


def test_an_sae_never_collated(tmp_path):
    sae = tmp_path / "run" / "saes" / "1" / "resid_post"
    TopKSAE(8, 16, 2).save(sae)
    one_line_error(*export(sae, tmp_path / "np"), "no records", "saepipe collate CONFIG --layers 1")
    assert not (tmp_path / "np").exists()


def test_a_record_over_1024_tokens_is_an_error_naming_collate_window(tmp_path):
    long = lambda i: _feature(i, n_tokens=1025 if i == 200 else 4)  # noqa: E731 - found after batch-0.json is written
    sae = synthetic(tmp_path, 260, feature=long, window=600)
    out = tmp_path / "exports" / "np"
    one_line_error(*export(sae, out), "latent 200", "1025 tokens", "collate.window: 600",
                   "collate.window to 511 or less")
    assert not (tmp_path / "exports").exists(), "the folder made for --out goes with the failed export"


# --------------------------------------------------------------------------- the schema refuses what the route does
def _valid_body() -> dict:
    return {"modelId": "m", "source": "3-set", "features": [{
        "index": 0, "density": 0.5,
        "topLogits": [{"token": "a", "value": 1.0}], "bottomLogits": None,
        "explanations": [{"text": "dogs", "methodName": "n2g", "modelName": None}],
        "activations": [{"tokens": ["a", "b"], "values": [0.0, 1.5], "quantileMax": 2.0, "quantileMin": 1.0,
                         "quantileFraction": 0.25}]}]}


@pytest.mark.parametrize("break_it, why", [
    (lambda b: b["features"][0].update(topLogits=[{"token": f"t{k}", "value": 1.0} for k in range(21)]), "21 logits"),
    (lambda b: b["features"][0]["activations"][0].update(tokens=["a"] * 1025, values=[0.0] * 1025), "1025 tokens"),
    (lambda b: b["features"][0]["activations"][0]["tokens"].__setitem__(0, ""), "an empty token"),
    (lambda b: b["features"][0]["activations"][0].update(quantileFraction=-1), "fraction -1"),
    (lambda b: b["features"][0].update(activations=[]), "no activation"),
    (lambda b: b["features"][0]["explanations"][0].update(text="x" * 513), "513 characters"),
    (lambda b: b["features"][0].update(density=None), "a null density"),
    (lambda b: b.update(features=[copy.deepcopy(b["features"][0]) for _ in range(129)]), "129 features"),
    (lambda b: b.update(source="3-set__extra"), "'__' in the source"),
    (lambda b: b.update(modelId="Model"), "an upper-case model id"),
    (lambda b: b["features"][0].update(Density=0.5), "a misspelled key"),
])
def test_schema_refuses(break_it, why):
    VALIDATOR.validate(_valid_body())
    body = _valid_body()
    break_it(body)
    assert not VALIDATOR.is_valid(body), why


def test_schema_is_draft_2020_12_and_route_rules_are_checked():
    jsonschema.Draft202012Validator.check_schema(neuronpedia.schema())
    assert neuronpedia.schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    body = _valid_body()
    body["features"][0]["activations"][0]["values"].append(2.0)
    VALIDATOR.validate(body)  # lengths: beyond JSON Schema, so check_batch holds them
    with pytest.raises(ValueError, match="tokens"):
        neuronpedia.check_batch(body)
    body = _valid_body()
    body["features"].append(copy.deepcopy(body["features"][0]))
    with pytest.raises(ValueError, match="unique"):
        neuronpedia.check_batch(body)
