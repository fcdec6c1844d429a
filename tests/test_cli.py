"""The rlhf-influence command: version, help, one-line errors for bad arguments, read-only."""

import subprocess
import sys

import pytest
from test_audit import make_run, tree_digest

from rlhf_influence import __version__
from rlhf_influence.cli import main


def test_console_script_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_influence.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"rlhf-influence {__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_influence.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "attribution" in out.stdout


BEHAVIOUR = ["--prompt", "the movie was", "--response", "great"]
BAD_ARGS = [  # (arguments after the run, phrase of the one-line message)
    (["audit", "--z", "nan"], "argument --z: must be a finite number >= 0, got nan"),
    (["audit", "--min-delta", "-1"], "argument --min-delta: must be a finite number >= 0, got -1.0"),
    (["audit", "--top", "0"], "argument --top: must be a whole number >= 1, got 0"),
    (["score", "--round", "0", *BEHAVIOUR], "argument --round: must be a whole number >= 1, got 0"),
    (["score", "--round", "one", *BEHAVIOUR], "argument --round: 'one' is not a whole number"),
    (["diagnose", "--bottom-fraction", "0.7"], "argument --bottom-fraction: must be a finite number > 0 and <= 0.5, got 0.7"),
    (["formation", *BEHAVIOUR, "--rounds", "2", "x"], "argument --rounds: 'x' is not a whole number"),
    (["intervene", "--round", "1", "--remove", "-1", *BEHAVIOUR], "argument --remove: must be a whole number >= 1, got -1"),
    (["intervene", "--round", "1", "--seed", "-3", *BEHAVIOUR], "argument --seed: must be a whole number >= 0, got -3"),
    (["report", "--top", "-2"], "argument --top: must be a whole number >= 1, got -2"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD_ARGS)
def test_bad_arguments_get_one_line_and_status_2(tmp_path, capsys, args, message):
    run = make_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([args[0], str(run), *args[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_every_command_leaves_the_store_unchanged(tmp_path, capsys):
    run = make_run(tmp_path)
    before = tree_digest(run)
    for args in (["audit"], ["audit", "--json"], ["diagnose"], ["report", "-o", str(tmp_path / "r.html")],
                 ["score", "--round", "2", *BEHAVIOUR], ["formation", *BEHAVIOUR],
                 ["intervene", "--round", "2", *BEHAVIOUR], ["report", "-o", str(run / "r.html")]):  # fmt: skip
        main([args[0], str(run), *args[1:]])  # some fail (this store keeps no gradients): none may write
    capsys.readouterr()
    assert tree_digest(run) == before
