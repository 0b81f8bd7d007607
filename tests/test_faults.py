"""The fault campaign's short version, as tests: each scenario runs real
daemons and client processes and checks its invariants itself (no wrong
bytes, no acknowledged sync put lost, clear errors, the daemon survives)."""
import pytest

from kvfstools.faults import run


@pytest.mark.parametrize("name", ["crash", "diskfull", "corrupt", "fuzz", "deadclient", "load", "powercut"])
def test_fault_scenario(tmp_path, name):
    res = run(tmp_path, [name], quick=True)[name]
    if res.get("ok") is None:
        pytest.skip(res["skipped"])
    assert res["ok"], res["failures"]
    if name == "crash":
        assert res["sync_acked"] > 0 and res["reads_checked"] > 0
    if name == "fuzz":
        assert res["frames_tried"] > 100
    if name == "load":
        assert res["operations"] > 100 and res["wrong_bytes"] == 0 and res["errors"] == 0


def test_cli_faults_quick(tmp_path):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "faults", "--quick", "--only", "deadclient",
                        "--dir", str(tmp_path), "--json", str(tmp_path / "f.json")], capture_output=True)
    assert r.returncode == 0 and b"deadclient ok" in r.stdout
    assert json.loads((tmp_path / "f.json").read_text())["deadclient"]["ok"] is True
    # --dir keeps each scenario's daemon logs (to read why something failed), not its stores
    logs = list((tmp_path / "logs" / "deadclient").iterdir())
    assert logs and all(p.name.endswith(".log") for p in logs)
    assert any("listening on" in p.read_text() and "bye" in p.read_text() for p in logs)
    assert not (tmp_path / "deadclient").exists()
