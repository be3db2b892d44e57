"""The worked example of docs/python-api.md runs as written, and ``import probekit`` gives the entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import probekit

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python-api.md"


def test_every_entry_point_of_the_table_is_a_name_of_the_package():
    names = set(re.findall(r"^\| `probekit\.(\w+)", PAGE.read_text(), re.M))
    assert names <= set(probekit.__all__), names - set(probekit.__all__)
    assert {"load_dataset", "extract", "Cache", "sweep", "read_results", "finetune", "generate", "report"} <= names


def test_import_probekit_loads_neither_torch_nor_jax_and_the_packages_stay_callable():
    code = ("import sys, probekit; assert 'torch' not in sys.modules and 'jax' not in sys.modules;"
            "f = probekit.extract; import probekit.extract.run, probekit.finetune.run, probekit.report.compare;"
            "assert probekit.extract is f and callable(probekit.extract) and callable(probekit.finetune) "
            "and callable(probekit.report); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "ok", done.stderr
    with pytest.raises(AttributeError, match="no attribute 'sweeep'"):
        probekit.sweeep  # noqa: B018


@pytest.mark.slow
def test_the_worked_example_runs_as_written(tmp_path):
    text = PAGE.read_text()
    block = re.search(r"## A worked example.*?```python\n(.*?)```", text, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("654 items; measures: grade")
    assert "answer_end at the last layer: (654, 4, 576)" in done.stdout
    assert (tmp_path / "work" / "report" / "report.md").is_file()
    last = lines[-1].split()
    assert last[:3] == ["grade", "layer", "30"] and "estimable" in last
