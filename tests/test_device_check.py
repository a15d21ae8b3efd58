"""benchmarks/device_check.py runs its CPU side and exits 0 on a machine without CUDA (or with
--cpu-only), printing one table row per check; on a GPU machine it is the session's device check."""

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "device_check.py"


@pytest.mark.slow
def test_cpu_only_run_prints_every_cpu_check_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [SCRIPT.name, "--cpu-only"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert stop.value.code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4, out
    assert all(row.split(" | ")[2] == "ok" for row in rows), out
    assert "CPU side only" in out
