"""Config loading: types, overrides, and the one-line errors."""

import pytest

from pipeline.config import ConfigError, load_config, parse_layers

BASE = """
run_dir: runs/x
model: {name: some/model}
data: {path: data.jsonl}
harvest: {layers: [3], n_tokens: 1024, context_size: 64}
"""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_overrides_and_yaml_floats(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train: {lr: 4e-4}\n"),
                      ["harvest.layers=[1, 2]", "train.k=16", "collate.window=8"])
    assert cfg.harvest.layers == [1, 2] and cfg.train.sae.k == 16 and cfg.collate.window == 8
    assert cfg.train.lr == pytest.approx(4e-4)  # YAML 1.1 reads 4e-4 as a string
    assert cfg.harvest.hooks == ["resid_post"] and cfg.harvest.storage_dtype == "bfloat16"


@pytest.mark.parametrize("extra, overrides, needle", [
    ("harvest: {layers: [3], n_tokens: 1024, bogus: 1}\n", [], "unknown key harvest.bogus"),
    ("", ["train.lr=-1"], "train.lr = -1.0 must be > 0"),
    ("", ["train.k=0"], "train.sae.k = 0 must be > 0"),
    ("", ["train.optimizer=sgd"], "train.optimizer = 'sgd'"),
    ("", ["train.lr_schedule=step"], "train.lr_schedule = 'step'"),
    ("", ["train.sf_beta=1"], "train.sf_beta = 1.0 must be in"),
    ("", ["harvest.codec=brotli"], "harvest.codec = 'brotli'"),
    ("", ["harvest.layers=three"], "harvest.layers = 'three' should be a list of an integer"),
    ("", ["harvest.chunk_rows=100"], "multiple of"),
])
def test_errors_name_the_key(tmp_path, extra, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, BASE + extra), overrides)


def test_parse_layers():
    assert parse_layers("3,4") == [3, 4] and parse_layers("3 4") == [3, 4] and parse_layers("") is None


# --------------------------------------------------------------------------- types: unions, bools, lone values
@pytest.mark.parametrize("value, expected", [
    ("a.jsonl", "a.jsonl"),
    ("[a.jsonl, b.jsonl]", ["a.jsonl", "b.jsonl"]),
    ("null", None),
])
def test_union_takes_each_of_its_types(tmp_path, value, expected):
    cfg = load_config(write(tmp_path, BASE), [f"data.data_files={value}"])
    assert cfg.data.data_files == expected


@pytest.mark.parametrize("value", ["{a: 1}", "[a.jsonl, {b: 1}]", "[[a.jsonl]]"])
def test_union_refuses_what_none_of_its_types_takes(tmp_path, value):
    with pytest.raises(ConfigError, match=r"data\.data_files = .* should be a string or a list of a string or null"):
        load_config(write(tmp_path, BASE), [f"data.data_files={value}"])


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("yes", True), ("off", False)])
def test_bool_takes_yaml_booleans(tmp_path, value, expected):
    # YAML 1.1 (PyYAML) spells booleans true/false, yes/no, on/off: all are booleans before we see them.
    assert load_config(write(tmp_path, BASE), [f"data.streaming={value}"]).data.streaming is expected


@pytest.mark.parametrize("value", ["1", "0", "'yes'", "enabled", "[true]"])
def test_bool_refuses_numbers_and_strings(tmp_path, value):
    with pytest.raises(ConfigError, match=r"data\.streaming = .* should be true or false$"):
        load_config(write(tmp_path, BASE), [f"data.streaming={value}"])


def test_integers_refuse_bools_and_fractions(tmp_path):
    for value in ("true", "2.5"):
        with pytest.raises(ConfigError, match=r"train\.sae\.k = .* should be an integer$"):
            load_config(write(tmp_path, BASE), [f"train.k={value}"])


def test_a_lone_value_where_a_list_is_expected_is_a_list_of_one(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("layers: [3]", "layers: 3")), ["harvest.hooks=mlp_out"])
    assert cfg.harvest.layers == [3] and cfg.harvest.hooks == ["mlp_out"]
    cfg = load_config(write(tmp_path, BASE), ["train.layers=5"])
    assert cfg.train.layers == [5] and cfg.targets("train") == [(5, "resid_post")]
    with pytest.raises(ConfigError, match=r"train\.adam_betas = 0\.9 should be a list of a number"):
        load_config(write(tmp_path, BASE), ["train.adam_betas=0.9"])  # two numbers, not one


# --------------------------------------------------------------------------- --set
@pytest.mark.parametrize("item, needle", [
    ("train.k", "--set 'train.k': expected key=value, e.g. harvest.n_tokens=100000"),
    ("run_dir.x=1", "--set 'run_dir.x=1': run_dir is not a section"),
    ("harvest.layers.x=1", "--set 'harvest.layers.x=1': layers is not a section"),
    ("train.k=[1, 2", "--set 'train.k=[1, 2': value is not valid YAML"),
    ("train.kk=3", "unknown key train.kk"),
    ("nosuch.k=3", "unknown key nosuch"),
])
def test_set_errors_are_one_line_naming_the_item(tmp_path, item, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [item])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_set_fills_an_empty_section(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train:\n"), ["train.k=4", "collate.seed=3"])
    assert cfg.train.sae.k == 4 and cfg.collate.seed == 3


def test_set_errors_through_the_cli_exit_2_in_one_line(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main

    result = CliRunner().invoke(main, ["train", str(write(tmp_path, BASE)), "--set", "train.k"])
    assert result.exit_code == 2 and result.output == (
        "saepipe: error: --set 'train.k': expected key=value, e.g. harvest.n_tokens=100000\n")


# --------------------------------------------------------------------------- targets
def test_targets_fall_back_stage_by_stage_and_drop_repeats(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["harvest.layers=[1, 2, 1]", "harvest.hooks=[resid_post, mlp_out]"])
    both = [(1, "resid_post"), (1, "mlp_out"), (2, "resid_post"), (2, "mlp_out")]
    assert cfg.targets("harvest") == cfg.targets("train") == cfg.targets("collate") == both
    assert cfg.targets("train", [2, 2]) == [(2, "resid_post"), (2, "mlp_out")]
    cfg = load_config(write(tmp_path, BASE), ["train.layers=[4]", "train.hooks=[attn_out]", "collate.hooks=[mlp_out]"])
    assert cfg.targets("train") == [(4, "attn_out")]
    assert cfg.targets("collate") == [(4, "mlp_out")]  # layers from train, hooks its own
    assert cfg.targets("harvest") == [(3, "resid_post")]


# --------------------------------------------------------------------------- the documented reference
def test_every_field_is_documented_and_the_docs_hold_the_generated_reference():
    import dataclasses
    import typing
    from pathlib import Path

    from pipeline.config import Config, markdown

    sections = [Config, *(t for t in typing.get_type_hints(Config).values() if dataclasses.is_dataclass(t))]
    undocumented = [f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls)
                    if f.name not in ("model", "data", "harvest", "train", "collate", "eval", "finetune", "explain")
                    and not f.metadata.get("doc")]
    assert len(sections) == 9 and undocumented == []
    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    start = page.index("<!-- generated by `python -m pipeline.config --markdown`")
    start = page.index("\n", start) + 1
    end = page.index("<!-- end of the generated config reference -->")
    assert page[start:end] == markdown(), \
        "docs/config.md's config reference is stale: paste `python -m pipeline.config --markdown`"
