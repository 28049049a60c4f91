"""The examples run top to bottom: notebooks on a real Jupyter kernel, scripts as scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "batch_summarise.ipynb"])
def test_notebook_runs_on_a_real_kernel(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if name == "quickstart.ipynb":
        assert "Paris" in text and "served by" in text
    else:
        assert "docs/s" in text and "tokens/s" in text and "skipped (already in the output)" in text


def run_example(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_quickstart_script():
    out = run_example(str(EXAMPLES / "quickstart.py"))
    assert out.returncode == 0, out.stderr
    assert "answer:" in out.stdout and "Paris" in out.stdout and "served by" in out.stdout


def test_async_script():
    out = run_example(str(EXAMPLES / "async_chat.py"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" -> ") == 4


def test_batch_script(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"Report {i}: the bridge over the river was repaired in spring.")
    out = run_example(str(EXAMPLES / "batch_summarise.py"), str(docs), str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    assert "3 files" in out.stdout and "3 done" in out.stdout
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 3
    # A folder that does not exist, or holds no .txt file, is an error (it used to exit 0: "0 files").
    for folder in (tmp_path / "nowhere", tmp_path):
        out = run_example(str(EXAMPLES / "batch_summarise.py"), str(folder), str(tmp_path / "none.jsonl"))
        assert out.returncode == 2 and str(folder) in out.stderr and not (tmp_path / "none.jsonl").exists(), out.stderr
