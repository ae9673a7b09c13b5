"""Bad input is one line and exit code 2; every other exception keeps its traceback."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli
from loader.labels import DatasetNotFoundError
from utils.errors import BadInputError, InvalidInputError, one_line

ROOT = Path(__file__).resolve().parents[1]


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", default="0")
    return p


def raising(exc):
    def main(args):
        raise exc

    return main


def test_bad_input_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.run(raising(DatasetNotFoundError("data directory not found: /nowhere")), parser(), argv=[])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data directory not found: /nowhere\n"


@pytest.mark.parametrize(
    "exc", [ValueError("shape mismatch in my new loss"), RuntimeError("bug"), FileNotFoundError("an internal file")]
)
def test_other_exceptions_propagate_with_their_traceback(exc):
    with pytest.raises(type(exc), match=str(exc)):
        cli.run(raising(exc), parser(), argv=[])


def test_project_errors_still_are_builtin_errors():
    assert issubclass(DatasetNotFoundError, FileNotFoundError) and issubclass(InvalidInputError, ValueError)
    assert issubclass(DatasetNotFoundError, BadInputError)


def test_one_line_keeps_the_original_message_of_a_worker_error():
    err = InvalidInputError(
        "Caught InvalidInputError in DataLoader worker process 0.\nOriginal Traceback "
        '(most recent call last):\n  File "x.py", line 1\nutils.errors.InvalidInputError: '
        "cannot read image a.jpg"
    )
    assert one_line(err) == "cannot read image a.jpg"


def test_a_value_error_in_a_stage_shows_its_traceback(tmp_path):
    """A bug in the maths (here a ValueError from a shape check) is not disguised as bad input."""
    script = tmp_path / "buggy_stage.py"
    script.write_text(
        "import torch\nfrom modules.ops import grid_sample_tokens\nfrom engine import cli\nimport argparse\n"
        "def main(args):\n    grid_sample_tokens(torch.zeros(2, 3))\n"
        "p = argparse.ArgumentParser(); p.add_argument('--gpu', default='0')\ncli.run(main, p)\n"
    )
    res = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "ValueError: grid_sample_tokens" in res.stderr
