"""The README's quick start is the contract of a fresh machine: exactly two commands, the second is what CI runs,
and the first starts a studio that serves."""

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.strip().splitlines()]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    setup_and_start, setup_and_test = cmds
    assert setup_and_start.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert setup_and_start.endswith("studio ui")
    assert "pytest" in setup_and_test and '".[test,ray]"' in setup_and_test  # CI runs the Ray farm tests too
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci, ".ci/run must run the README's test command verbatim"


def test_studio_ui_starts_and_serves(tmp_path, free_port):
    """`studio ui` (the first command's last step) serves the page on its port."""
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "studio.cli", "ui", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(0.5)
        assert "Shot Studio" in body, log.read_text()[-2000:]
        # files outside the studio's output folder are not served
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={ROOT / 'README.md'}",
                                        timeout=5) as r:
                assert r.status >= 400
        except urllib.error.HTTPError as e:
            assert e.code >= 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)
