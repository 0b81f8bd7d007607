"""The daemon's configuration files (kvfstools.config_file): TOML under the
flags, one-line errors naming the key and the file, `kvfs config --show`,
a daemon run from a file alone, and the shipped example and systemd unit
(docs/kvfs.toml, docs/kvfs.service; readiness through $NOTIFY_SOCKET)."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvfs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def kvfs_cmd(*argv, env=None, timeout=60):
    e = dict(os.environ)
    e.pop("KVFS_ROOT", None)
    e["KVFS_SYSTEM_CONFIG"] = "/nonexistent/kvfs.toml"  # no node file unless a test names one
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvfstools.cli", *argv], capture_output=True, text=True,
                          env=e, timeout=timeout)


def show(*argv, env=None):
    r = kvfs_cmd("config", "--json", *argv, env=env)
    assert r.returncode == 0, r.stderr
    return {row["key"]: (row["value"], row["from"]) for row in json.loads(r.stdout)}


def one_line_error(r, *wanted):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in wanted:
        assert w in err, (w, err)


def test_files_are_layered_under_the_flags_and_each_value_says_where_it_came_from(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    node = tmp_path / "node.toml"
    node.write_text(f'root = "{root}"\nshm-size = "1G"\ndurability = "sync"\npromote-after = 5\n')
    (root / "kvfs.toml").write_text('shm-size = "2G"\nstripe = ["/a", "/b"]\n')  # the store's file
    named = tmp_path / "named.toml"
    named.write_text("promote-after = 7\ncompact-at = 0.3\n")
    cfg = show("--config", str(named), "--compact-at", "0.4", env={"KVFS_SYSTEM_CONFIG": str(node)})
    assert cfg["root"] == (str(root), str(node))
    assert cfg["durability"] == ("sync", str(node))  # only the node's file sets it
    assert cfg["shm-size"] == ("2G", str(root / "kvfs.toml"))  # the store's file wins over the node's
    assert cfg["stripe"] == (["/a", "/b"], str(root / "kvfs.toml"))
    assert cfg["promote-after"] == (7, str(named))  # --config's wins over both
    assert cfg["compact-at"] == (0.4, "command line")  # and the flags over every file
    assert cfg["lease-timeout"] == (30.0, "default")
    # the root: the flag, then $KVFS_ROOT, then the files
    other = tmp_path / "other"
    assert show("--root", str(other), env={"KVFS_SYSTEM_CONFIG": str(node)})["root"] == (str(other), "command line")
    assert show(env={"KVFS_SYSTEM_CONFIG": str(node), "KVFS_ROOT": str(other)})["root"] == (str(other), "$KVFS_ROOT")
    # the table for people
    r = kvfs_cmd("config", "--show", "--config", str(named))
    assert r.returncode == 0 and "promote-after" in r.stdout and str(named) in r.stdout


@pytest.mark.parametrize("text, wanted", [
    ('shm_size = "1G"\n', ["shm_size", "not a setting", "did you mean shm-size"]),
    ('no-such-flag = 1\n', ["no-such-flag", "not a setting"]),
    ('shm-size = "lots"\n', ["shm-size", "not a size"]),
    ('durability = "maybe"\n', ["durability", "one of fast, sync"]),
    ('promote-after = "many"\n', ["promote-after", "invalid literal"]),
    ('promote-after = true\n', ["promote-after", "not bool"]),
    ('dir-slots = 1000\n', ["dir-slots", "power of two"]),
    ('durability = \n', ["not valid TOML"]),
])
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(tmp_path, text, wanted):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    for cmd in (["config", "--show"], ["daemon", "--root", str(tmp_path / "s")]):
        r = kvfs_cmd(*cmd, "--config", str(f))
        one_line_error(r, str(f), *wanted)
    assert not (tmp_path / "s").exists()  # refused before any work


def test_the_store_file_cannot_move_the_store_and_a_named_file_must_exist(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / "kvfs.toml").write_text(f'root = "{tmp_path}/elsewhere"\n')
    one_line_error(kvfs_cmd("config", "--root", str(root)), "kvfs.toml", "root")
    one_line_error(kvfs_cmd("config", "--config", str(tmp_path / "missing.toml")), "missing.toml", "no such file")


def test_a_daemon_runs_from_a_file_alone_and_tells_systemd_it_is_ready(tmp_path):
    root = tmp_path / "store"
    sock = tmp_path / "kvfs.sock"
    f = tmp_path / "kvfs.toml"
    f.write_text(f'root = "{root}"\nsocket = "{sock}"\nshm-size = "16M"\ncapacity = "256M"\n'
                 'durability = "sync"\n')
    notify = tmp_path / "notify"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd holds for a Type=notify unit
    systemd.bind(str(notify))
    systemd.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), KVFS_SYSTEM_CONFIG="/nonexistent/kvfs.toml")
    env.pop("KVFS_ROOT", None)
    p = subprocess.Popen([sys.executable, "-m", "kvfstools.cli", "daemon", "--config", str(f)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert systemd.recv(64) == b"READY=1"  # sent once the socket listens
        with kvfs.connect(str(sock)) as s:
            s.put("k", b"from a file", ns="cfg")
            assert s.get("k", ns="cfg") == b"from a file"
            st = s.stats()
            assert st["durability"] == "sync" and st["capacity_bytes"] == 256 << 20
        p.send_signal(signal.SIGTERM)
        assert systemd.recv(64) == b"STOPPING=1"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        systemd.close()
    assert (root / "index").exists()


def test_the_shipped_unit_runs_a_command_that_parses_with_the_shipped_example():
    unit = (DOCS / "kvfs.service").read_text().splitlines()
    assert "Type=notify" in unit
    exec_start = next(line.split("=", 1)[1] for line in unit if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "kvfs" and argv[1] == "daemon"
    # the unit's own flags, with the example as the file they name
    flags = [a if a != "/etc/kvfs/kvfs.toml" else str(DOCS / "kvfs.toml") for a in argv[2:]]
    cfg = show(*flags)
    assert cfg["root"] == ("/var/lib/kvfs", str(DOCS / "kvfs.toml"))
    assert cfg["mount"][1] == str(DOCS / "kvfs.toml") and cfg["shm-size"] == ("16G", str(DOCS / "kvfs.toml"))
