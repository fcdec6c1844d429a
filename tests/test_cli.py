import subprocess
import sys

from rlhf_influence import __version__


def test_console_script_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_influence.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"rlhf-influence {__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_influence.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "attribution" in out.stdout
