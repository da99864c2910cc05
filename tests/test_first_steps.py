"""What a newcomer meets first: the README's install lines, the daemon's own name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from client_helpers import SHELLS, make_shell
from conftest import REPO

import perpetual_motion as pm


def install_block(readme: str) -> str:
    """The lines the README says to put into ~/.bashrc or ~/.zshrc."""
    text = (REPO / readme).read_text()
    match = re.search(r"```bash\n(# [^\n]*(?:bashrc|\.zshrc)[^\n]*\n.*?)```", text, re.S)
    assert match, readme
    return match.group(1)


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
@pytest.mark.parametrize("shell", SHELLS)
def test_the_install_lines_are_silent_before_the_instance_exists(shell, readme, tmp_path):
    sh = make_shell(shell, tmp_path)
    rc = tmp_path / "rc"
    rc.write_text(install_block(readme).replace("/path/to/perpetual-motion/client.sh",
                                                str(REPO / "client.sh")))
    res = sh.run(f'source "{rc}"; echo "JOB_ID=$JOB_ID"', source=False)
    assert (res.rc, res.out, res.err) == (0, "JOB_ID=train-exp1\n", "")
    res = sh.run(f'source "{rc}"; gpu_status; echo "rc=$?"', source=False)
    assert res.out.endswith("rc=1\n") and "no instance train-exp1" in res.err


def test_the_console_script_names_itself(tmp_path):
    assert pm.console_name("/home/me/.local/bin/perpetual-motion") == "perpetual-motion"
    assert pm.console_name("perpetual_motion.py") == "perpetual_motion.py"
    script = tmp_path / "perpetual-motion"  # as pip writes it
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from perpetual_motion import main\nsys.exit(main())\n")
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: perpetual-motion [")


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_the_readmes_say_what_needs_installing(readme):
    """torch only for keep-alive, and its CPU build where there is no GPU; no install for the
    client."""
    text = (REPO / readme).read_text()
    quick = text[:text.index("source client.sh && gpu_use local")]
    assert "python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick
    assert "`psutil`" in quick and "`nvidia-ml-py`" in quick and "`client.sh`" in quick
