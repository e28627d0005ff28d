"""click's own usage errors come out as our one line, exit 2, no usage block."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from stages.cli import main


@pytest.mark.parametrize("args, needle", [
    (lambda t: ["harvest", str(t)], "is a directory"),
    (lambda t: ["train", str(t / "none.yaml"), "--bogus"], "No such option '--bogus'"),
    (lambda t: ["export", str(t), "--format", "onnx", "--out", str(t / "x")], "'onnx' is not one of"),
    (lambda t: ["export", str(t), "--format", "saelens", "--out", str(t / "file.txt")], "is a file"),
    (lambda t: ["verify", str(t / "file.txt")], "expected a mapping of sections"),  # a file: read as a CONFIG
    (lambda t: ["verify", str(t), "--set", "a=1"], "--set needs a CONFIG"),
    (lambda t: ["nosuch"], "No such command 'nosuch'"),
])
def test_click_errors_are_one_line(tmp_path, args, needle):
    (tmp_path / "file.txt").write_text("x")
    res = CliRunner().invoke(main, args(tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saepipe: error: ") and needle in lines[0], res.output
    assert "Usage:" not in res.output and "Traceback" not in res.output


def test_help_and_version_still_exit_zero():
    for args in (["--help"], ["train", "--help"], ["--version"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0 and res.output, (args, res.output)
