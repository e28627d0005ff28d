"""Neuronpedia's feature upload: one SAE's collated records and N2G explanations as the
request bodies of Neuronpedia's `POST /api/feature/upload-batch`.

Where the format comes from: Neuronpedia's webapp (github.com/hijohnnylin/neuronpedia),
the route apps/webapp/app/api/feature/upload-batch/route.tsx (its yup schema and the checks
after it) and the Python client that posts to it (webapp-python-client, FeatureRequest.
upload_batch, MAX_FEATURES_PER_BATCH = 128). What the route takes:

    {"modelId": str, "source": "{layer}-{setName}", "features": [            1..128 features
      {"index": int 0..10^7,                                                 unique in the batch
       "density": number 0..1,                                               -> Neuron.frac_nonzero
       "topLogits" / "bottomLogits": [{"token": str, "value": number}] <= 20 -> pos_* / neg_*
       "explanations": [{"text": 1..512 chars, "methodName", "modelName"}],  names Neuronpedia knows
       "activations": [{"tokens": [str] 1..1024, "values": [number] 1..1024 (as many as tokens),
                        "quantileMax", "quantileMin": <= 99999999,
                        "quantileFraction": 0..1}]}]}                        >= 1 per feature

Its yup `string().required()` refuses "" (every token string and logit token must be
non-empty). pipeline/neuronpedia.schema.json states all this as a JSON Schema (draft 2020-12);
`check_batch` adds the two rules JSON Schema cannot say. The model and the source set must
exist on Neuronpedia, created by the uploader, before a batch goes up.

`saepipe export RUN_DIR/saes/L/HOOK --format neuronpedia --out DIR` writes into DIR:

    batch-<j>.json   one request body each, features in latent order, 128 a file (the last fewer)
    manifest.json    modelId, source, the batches, and every latent left out or changed, and why

How a records folder (pipeline.collate.records) maps:

- `density`: the record's density.
- `topLogits` / `bottomLogits`: the logit lens's tokens, collate's `top_upvote_*` and
  `top_downvote_*` (records.LENS_K = 10 each way, under the 20 the route takes); absent
  when collate had no lens.
- `activations`: the top records first, as one section: quantileMin and quantileMax the
  smallest and largest act among them, quantileFraction their count over the latent's
  positive activations (n_positive). Then each collate quantile interval's examples:
  quantileMin/Max its bounds (lo, hi], quantileFraction its count / n_positive. A record's
  `tokens` and `acts` are the activation's tokens and values. The random records are left
  out: the quantile examples are uniform samples of each interval already.
- `explanations`: the N2G text of explanations.json (`saepipe explain`), methodName "n2g",
  modelName null (N2G asks no explainer model). Neuronpedia refuses a batch naming an
  explanation method it does not list; see docs/guides/neuronpedia.md.

Nothing is dropped or cut without the manifest saying so, and what cannot be kept is an
error: a latent without records (never fired: the route needs an activation) is left out
and listed (`left_out`); a live latent whose N2G found no pattern goes up without an
explanation and is listed (`no_explanation`); an N2G text over 512 characters is split
between patterns into several explanations and listed (`split_explanations`), a single
pattern over 512 is an error; an empty token string (a token holding only part of a UTF-8
character: TokenText gives the character to the token completing it) becomes U+FFFD, the
character such a token decodes to alone, and is counted (`empty_tokens_replaced`); a record
longer than 1024 tokens is an error naming collate.window.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

import pipeline
from pipeline import fsio, viewer
from pipeline.collate import explain
from pipeline.errors import UserError
from pipeline.paths import DONE, records_dir, sae_dir as sae_folder, split_leaf
from pipeline.saes import trained

SCHEMA_FILE = "neuronpedia.schema.json"
MANIFEST = "manifest.json"
ENDPOINT = "POST https://neuronpedia.org/api/feature/upload-batch"  # where its Python client posts
# The route's limits (upload-batch/route.tsx).
MAX_FEATURES = 128
MAX_LOGITS = 20
MAX_TOKENS = 1024
MAX_TEXT = 512
MAX_INDEX = 10_000_000
MAX_QUANTILE = 99_999_999
METHOD_NAME = "n2g"
EMPTY_TOKEN = "\ufffd"
_ID = re.compile(r"[a-z0-9_-]{1,128}")
_SET_NAME = re.compile(r"[a-z0-9]([a-z0-9_-]*[a-z0-9])?")


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of one batch file."""
    return json.loads(resources.files("pipeline").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def batch_name(j: int) -> str:
    return f"batch-{j}.json"


# ---------------------------------------------------------------------------
# Names: Neuronpedia's model id and source


def default_set_name(leaf: str) -> str:
    """`saepipe-<hook>` (a sweep member's `<hook>@<name>` as `<hook>-<name>`), in the characters
    a Neuronpedia set name may hold."""
    return "-".join(filter(None, ("saepipe", _slug(leaf))))


def default_model_id(model_name: str) -> str:
    """A Neuronpedia model id from model.name: its last path part (`HuggingFaceTB/SmolLM2-135M`
    -> `smollm2-135m`), lowercased, other characters as '-'. "" when nothing is left."""
    last = str(model_name).rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return _slug(last.removesuffix(".gguf"))


def _slug(text: str) -> str:
    text = re.sub(r"[^a-z0-9_-]+", "-", text.lower())
    return re.sub(r"_{2,}", "_", re.sub(r"-{2,}", "-", text)).strip("-_")


def check_model_id(model_id: str) -> str:
    model_id = model_id.lower()  # as the route does
    if not _ID.fullmatch(model_id):
        raise UserError(f"--np-model-id {model_id!r}: a Neuronpedia model id is 1-128 letters, digits, '_' or '-'")
    return model_id


def check_set_name(set_name: str) -> str:
    set_name = set_name.lower()  # as the route does
    if not _SET_NAME.fullmatch(set_name) or "__" in set_name:
        raise UserError(f"--np-set-name {set_name!r}: a Neuronpedia source set name is letters, digits, '_' and '-', "
                        "starting and ending with a letter or digit, without '__' (Neuronpedia reads what follows "
                        "'__' as extra information, not as the set's name)")
    return set_name


# ---------------------------------------------------------------------------
# One feature


@dataclass
class Tally:
    """What the manifest reports besides the batches: latents left out or changed."""
    left_out: list[int] = field(default_factory=list)  # no records: never fired
    no_explanation: list[int] = field(default_factory=list)  # live, but N2G found no pattern
    split_explanations: list[int] = field(default_factory=list)  # N2G text over MAX_TEXT, split
    empty_tokens_replaced: int = 0


def explanation_texts(entry: dict, index: int) -> list[str]:
    """The N2G text of an explanations.json entry, as texts of at most MAX_TEXT characters: the
    whole text when it fits, else its patterns (rendered as explain renders them) joined in
    order into as few texts as fit. [] when N2G found no pattern."""
    text = entry.get("text") or ""
    if len(text) <= MAX_TEXT:
        return [text] if text else []
    out: list[str] = []
    for pattern in (explain.render(p["tokens"]) for p in entry["patterns"]):
        if len(pattern) > MAX_TEXT:
            raise UserError(f"latent {index}'s N2G pattern {pattern[:40]!r}... is {len(pattern)} characters, over the "
                            f"{MAX_TEXT} a Neuronpedia explanation holds; explain with a smaller explain.max_suffix")
        if out and len(out[-1]) + 3 + len(pattern) <= MAX_TEXT:
            out[-1] += " | " + pattern
        else:
            out.append(pattern)
    return out


def _tokens(strings: list[str], tally: Tally) -> list[str]:
    empty = strings.count("")
    if empty:
        tally.empty_tokens_replaced += empty
        return [s or EMPTY_TOKEN for s in strings]
    return strings


def _logits(tokens: list[str], values: list[float], tally: Tally, index: int, which: str) -> list[dict]:
    if len(tokens) > MAX_LOGITS:
        raise UserError(f"latent {index}'s record holds {len(tokens)} {which} logit-lens tokens, more than the "
                        f"{MAX_LOGITS} Neuronpedia takes; these records come from another saepipe: rerun collate")
    return [{"token": t, "value": v} for t, v in zip(_tokens(list(tokens), tally), values)]


def _activations(records: list[dict], lo: float, hi: float, fraction: float, tally: Tally, index: int,
                 window) -> list[dict]:
    out = []
    for r in records:
        tokens, values = r["tokens"], r["acts"]
        if len(tokens) != len(values):
            raise UserError(f"latent {index}'s record at window {r.get('doc_id')} holds {len(tokens)} tokens but "
                            f"{len(values)} activations: the records are damaged; rerun collate and explain")
        if len(tokens) > MAX_TOKENS:
            each_side = "null (the whole stored window)" if window is None else window
            raise UserError(f"latent {index}'s record holds {len(tokens)} tokens, more than the {MAX_TOKENS} "
                            f"Neuronpedia takes per activation (collate.window: {each_side}); set collate.window "
                            f"to {(MAX_TOKENS - 1) // 2} or less and rerun collate and explain")
        out.append({"tokens": _tokens(tokens, tally), "values": values,
                    "quantileMax": hi, "quantileMin": lo, "quantileFraction": fraction})
    return out


def build_feature(record: dict, entry: dict | None, tally: Tally, window=None) -> dict | None:
    """The upload feature of one latent's record (viewer.read_feature's FeatureInfo) and its
    explanations.json entry; None for a latent without records (counted in tally.left_out)."""
    i = int(record["index"])
    top = record.get("top") or []
    if not top:
        tally.left_out.append(i)
        return None
    if i > MAX_INDEX:
        raise UserError(f"latent {i} is past the {MAX_INDEX} latents Neuronpedia numbers")
    n_positive = record.get("n_positive")
    if not n_positive:
        raise UserError(f"latent {i}'s record has top activations but no n_positive count: these records come from "
                        "an older saepipe; rerun collate and explain")
    acts = [r["act"] for r in top]
    activations = _activations(top, min(acts), max(acts), len(top) / n_positive, tally, i, window)
    for q in record.get("quantiles") or []:
        activations += _activations(q["examples"], q["lo"], q["hi"], q["count"] / n_positive, tally, i, window)
    peak = max(a["quantileMax"] for a in activations)
    if peak > MAX_QUANTILE:
        raise UserError(f"latent {i}'s activations reach {peak:g}, past the {MAX_QUANTILE} Neuronpedia takes as an "
                        "interval bound")

    feature = {"index": i, "density": float(record["density"])}
    if "top_upvote_tokens_logits" in record:
        feature["topLogits"] = _logits(record["top_upvote_tokens_logits"], record["top_upvotes_logits"], tally, i,
                                       "top")
        feature["bottomLogits"] = _logits(record["top_downvote_tokens_logits"], record["top_downvotes_logits"],
                                          tally, i, "bottom")
    if entry is None:
        raise UserError(f"explanations.json has no entry for latent {i}, which has records; rerun "
                        "`saepipe explain --force`")
    texts = explanation_texts(entry, i)
    if not texts:
        tally.no_explanation.append(i)
    elif len(texts) > 1:
        tally.split_explanations.append(i)
    feature["explanations"] = [{"text": t, "methodName": METHOD_NAME, "modelName": None} for t in texts]
    feature["activations"] = activations
    return feature


def batches(features: Iterable[dict], size: int = MAX_FEATURES) -> Iterator[list[dict]]:
    """Consecutive runs of at most `size` features (every run full but the last)."""
    if not 1 <= size <= MAX_FEATURES:
        raise ValueError(f"a batch holds 1..{MAX_FEATURES} features, not {size}")
    run: list[dict] = []
    for f in features:
        run.append(f)
        if len(run) == size:
            yield run
            run = []
    if run:
        yield run


def check_batch(body: dict) -> None:
    """The route's rules JSON Schema cannot state (the schema file holds the rest): unique feature
    indices, and as many values as tokens in every activation. ValueError when broken."""
    indices = [f["index"] for f in body["features"]]
    if len(set(indices)) != len(indices):
        raise ValueError("a batch's feature indices must be unique")
    for f in body["features"]:
        for a in f["activations"]:
            if len(a["tokens"]) != len(a["values"]):
                raise ValueError(f"feature {f['index']}: an activation has {len(a['tokens'])} tokens and "
                                 f"{len(a['values'])} values")


# ---------------------------------------------------------------------------
# The inputs


@dataclass
class Inputs:
    layer: int
    leaf: str  # the hook's folder name: <hook> or <hook>@<member>
    records: Path
    records_done: str  # explain.records_sha256 of the records read
    explanations: dict[int, dict]
    model_name: str | None
    window: int | None  # collate.window the records were cut with


def inputs(sae_dir) -> Inputs:
    """Everything the export reads, checked before anything is written; UserError (one line,
    what to run) when the SAE is unfinished, never collated, or not explained from these records."""
    folder = Path(os.path.abspath(sae_dir))
    hook, member = split_leaf(folder.name)
    run_dir, layer_name = folder.parent.parent.parent, folder.parent.name
    if folder.parent.parent.name != "saes" or not layer_name.isdigit() \
            or sae_folder(run_dir, int(layer_name), hook, member) != folder:
        raise UserError(f"{folder} is not a run's SAE folder (RUN_DIR/saes/<layer>/<hook>); --format neuronpedia finds "
                        "the SAE's records from there")
    layer, leaf = int(layer_name), folder.name
    marker, cfg = trained(folder, layer, leaf)
    records = records_dir(run_dir, layer, hook, member)
    done = fsio.read_json(records / DONE)
    if not done:
        raise UserError(f"no records for layer {layer} hook {leaf} (looked in {records}); --format neuronpedia exports "
                        f"them: run `saepipe collate CONFIG --layers {layer}` and `saepipe explain CONFIG --layers "
                        f"{layer}` first")
    made_from = (done.get("fingerprint") or {}).get("sae.sha256")
    if made_from != marker["sha256"]:
        raise UserError(f"the records in {records} were made from other weights than the SAE in {folder} has now; "
                        f"rerun `saepipe collate CONFIG --layers {layer}` and `saepipe explain CONFIG --layers "
                        f"{layer}`")
    explained = fsio.read_json(records / explain.FILE)
    if not explained:
        raise UserError(f"the records in {records} have no explanations ({explain.FILE}); Neuronpedia's features carry "
                        f"them: run `saepipe explain CONFIG --layers {layer}` first")
    records_done = explain.records_sha256(records)
    if (explained.get("fingerprint") or {}).get("records.done.sha256") != records_done:
        raise UserError(f"{records / explain.FILE} was made from other records than {records} holds now; rerun "
                        f"`saepipe explain CONFIG --layers {layer}`")
    by_latent = {int(e["latent"]): e for e in explained.get("latents", [])}
    model_name = cfg.get("model") or explained["fingerprint"].get("model.name")
    window = (done.get("fingerprint") or {}).get("collate.window")
    return Inputs(layer, leaf, records, records_done, by_latent, model_name, window)


# ---------------------------------------------------------------------------
# Writing


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _batch_text(model_id: str, source: str, features: list[dict]) -> str:
    # One feature a line: the body is the request as it is posted, and still greppable.
    body = ",\n".join(_dumps(f) for f in features)
    return f'{{"modelId":{_dumps(model_id)},"source":{_dumps(source)},"features":[\n{body}\n]}}\n'


def write(sae_dir, out, model_id: str | None = None, set_name: str | None = None) -> Path:
    """Write the Neuronpedia batches of the SAE in `sae_dir` into the new or empty folder `out`
    (pipeline.export.export checks `out` and calls this). `model_id`: Neuronpedia's id of the
    model (default: from the model's name); `set_name`: the source set's (default
    default_set_name of the hook). Returns `out`."""
    # The names given first: a typo is reported before any input is read.
    model_id = check_model_id(model_id) if model_id is not None else None
    set_name = check_set_name(set_name) if set_name is not None else None
    src = inputs(sae_dir)
    if model_id is None:
        model_id = default_model_id(src.model_name or "")
        if not model_id:
            raise UserError(f"cannot tell a Neuronpedia model id from the model name {src.model_name!r}; "
                            "give one with --np-model-id")
    set_name = set_name or check_set_name(default_set_name(src.leaf))
    source = f"{src.layer}-{set_name}"

    out = Path(out)
    # Built beside the target, then swapped in (as the weight formats do): a failure, or a record
    # found too long halfway, leaves no half-written --out.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    made = fsio.make_dirs(tmp, "--out", out)
    tally, written, n_latents = Tally(), [], 0
    try:
        def features() -> Iterator[dict]:
            nonlocal n_latents
            for record in viewer.read_features(src.records):
                n_latents += 1
                f = build_feature(record, src.explanations.get(int(record["index"])), tally, src.window)
                if f is not None:
                    yield f

        for j, run in enumerate(batches(features())):
            check_batch({"features": run})
            fsio.write_atomic(tmp / batch_name(j), _batch_text(model_id, source, run), durable=False)
            written.append({"file": batch_name(j), "n_features": len(run),
                            "first_index": run[0]["index"], "last_index": run[-1]["index"]})
        if not written:
            raise UserError(f"none of the {n_latents} latents of {src.records} ever fired: Neuronpedia takes a feature "
                            "only with an activation, so there is nothing to export")
        if explain.records_sha256(src.records) != src.records_done:
            raise UserError(f"the records in {src.records} changed while export ran (another collate?); rerun export")
        manifest = {
            "endpoint": ENDPOINT,
            "modelId": model_id,
            "source": source,
            "setName": set_name,
            "layer": src.layer,
            "hook": src.leaf,
            "n_latents": n_latents,
            "n_features": sum(b["n_features"] for b in written),
            "max_features_per_batch": MAX_FEATURES,
            "batches": written,
            "activations": "top records (quantileMin/Max: their smallest and largest act; quantileFraction: their "
                           "count / n_positive), then each collate quantile interval's examples (quantileMin/Max: "
                           "its bounds (lo, hi]; quantileFraction: its count / n_positive)",
            "explanations": {"from": explain.FILE, "methodName": METHOD_NAME, "modelName": None},
            "left_out": {"why": "no activation records (never fired): Neuronpedia needs at least one activation",
                         "latents": tally.left_out},
            "no_explanation": {"why": "N2G found no pattern in any example: uploaded without an explanation",
                               "latents": tally.no_explanation},
            "split_explanations": {"why": f"N2G text over {MAX_TEXT} characters: split between patterns",
                                   "latents": tally.split_explanations},
            "empty_tokens_replaced": {"why": "Neuronpedia refuses an empty token string; a token holding part of a "
                                             "character is empty in the records, and became U+FFFD",
                                      "count": tally.empty_tokens_replaced},
            "records": str(src.records),
            "saepipe_version": pipeline.__version__,
        }
        # A key a line, each value on its line: a list of thousands of latents stays one line.
        text = "{\n" + ",\n".join(f" {_dumps(k)}: {_dumps(v)}" for k, v in manifest.items()) + "\n}\n"
        fsio.write_atomic(tmp / MANIFEST, text, durable=False)
        with fsio.no_interrupt():
            fsio.swap_dir(tmp, out)  # one sync of the whole folder first
    except BaseException:
        if tmp.exists():  # not yet swapped in: nothing of this export is to stay
            shutil.rmtree(made or tmp, ignore_errors=True)
        raise
    return out


def summary(out) -> str:
    """The line `saepipe export` prints for a finished folder (from its manifest)."""
    m = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    extra = "".join(f"; {len(m[k]['latents'])} {what}" for k, what in (
        ("left_out", "latents without records left out"), ("no_explanation", "without an N2G explanation"),
        ("split_explanations", "with the explanation split")) if m[k]["latents"])
    return (f"export: wrote {m['n_features']} of {m['n_latents']} latents as {len(m['batches'])} Neuronpedia batch "
            f"file(s) for modelId {m['modelId']}, source {m['source']} into {out}{extra} ({MANIFEST} lists them)")
