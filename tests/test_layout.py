"""The source tree never hides the installed package: a script or ``python -m`` run from the
checkout root (where Python puts the current folder first on the import path) imports the whole
``headwater`` package, as from anywhere else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = (
    "import headwater, headwater.client, headwater.node.server, headwater.storage, headwater.raft, "
    "headwater.v1.client_pb2\n"
    "from headwater import Admin, Consumer, NewTopic, Producer, TopicAlreadyExistsError\n"
    "print(headwater.__file__)\n"
)


def test_a_script_in_the_checkout_root_imports_the_package(tmp_path: Path) -> None:
    for cwd in (ROOT, tmp_path):
        script = cwd / f"layout_probe_{tmp_path.name}.py"
        script.write_text(IMPORTS)
        try:
            run = subprocess.run([sys.executable, script.name], cwd=cwd, capture_output=True, text=True)
        finally:
            script.unlink()
        assert run.returncode == 0, run.stderr
        assert Path(run.stdout.strip()).name == "__init__.py"


def test_python_m_headwater_runs_from_the_checkout_root() -> None:
    for module in ("headwater", "headwater.node"):
        run = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert "usage:" in run.stdout
