"""The project installs as packages: entry points resolve, and nothing outside tests edits sys.path."""

import os
import re
import subprocess
import sys
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_commands_resolve_and_run():
    commands = {ep.name: ep for ep in metadata.entry_points(group="console_scripts") if ep.name.startswith("dejavu-")}
    assert set(commands) >= {"dejavu-convert-llama", "dejavu-convert-opt", "dejavu-infer", "dejavu-report",
                             "dejavu-drift"}
    for entry in commands.values():
        assert callable(entry.load())
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run([os.path.join(bin_dir, "dejavu-infer"), "--help"], capture_output=True, text=True,
                            cwd="/", timeout=120)
    assert result.returncode == 0 and "--model-type" in result.stdout


def test_no_sys_path_edits_outside_tests():
    edits = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    if re.search(r"\bsys\.path\b", handle.read()):
                        edits.append(os.path.relpath(path, ROOT))
    assert edits == []
