import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_four_client_processes_put_and_get_concurrently(daemon):
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = [subprocess.Popen([sys.executable, str(HERE / "mixed_client.py"), str(daemon.socket), str(me), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for me in range(1, 5)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == "0", f"wrong bytes seen: {out} {err}"
    with daemon.connect() as s:
        st = s.stats()
        assert st["objects"] == 4 * 40 + 40  # shared keys stored once
        assert st["leases"] == 0


def test_threads_share_one_store(store):
    from concurrent.futures import ThreadPoolExecutor
    from helpers import value_for

    def work(t):
        for i in range(t * 50, t * 50 + 50):
            store.put(f"t{i}", value_for(i))
            assert store.get(f"t{i}") == value_for(i)
        return True
    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(work, range(8)))
