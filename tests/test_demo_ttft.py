"""The TTFT demonstration's code path on the CPU (tiny random Llama): KV
blocks stored from a prefill, matched and loaded into one buffer, the cache
rebuilt, only the suffix prefilled, and the next-token logits equal to a
full recompute. The GPU run (Llama-3.1-8B shape, bf16) is the same code:
`kvfs demo-ttft` on the GPU machine."""
import argparse
import gc
import tempfile

import pytest

torch = pytest.importorskip("torch", reason="the demo needs torch (CI installs the CPU build)")
pytest.importorskip("transformers", reason="the demo needs transformers (CI installs it)")

from kvfsd.testing import DaemonProcess  # noqa: E402
from kvfstools.demo_ttft import (BLOCK_TOKENS, build_model, logits_agree, prompt_and_keys, run_demo,  # noqa: E402
                                 run_ttft)


@pytest.mark.parametrize("load", ["layerwise", "whole"])
def test_ttft_path_matches_full_recompute_from_t0_and_t1(tmp_path, load):
    res = run_demo(argparse.Namespace(device="cpu", model="tiny", tokens="1024,1300", suffix=40, dir=str(tmp_path),
                                      load=load))
    assert [r["tier"] for r in res["runs"]] == ["T0", "T0", "T1", "T1"]
    for r in res["runs"]:
        assert r["matched_blocks"] == r["blocks"] == r["tokens"] // BLOCK_TOKENS
        assert r["logits_ok"] and r["same_next_token"], r
        assert r["load_s"] > 0 and r["kvfs_ttft_s"] > 0
        if load == "layerwise":  # where the compute waited on the loads, per layer
            ins, waits = r["layer_in_s"], r["layer_wait_s"]
            assert len(ins) == len(waits) == 2  # the tiny model's layers
            assert 0 < ins[0] <= ins[1] == r["load_s"] and all(0 <= w <= i for w, i in zip(waits, ins))
            # the request's time is its parts: match, setup (the cache over the KV space), the loads, the rest
            assert r["match_s"] > 0 and r["setup_s"] > 0 and r["suffix_s"] > 0
            assert r["match_s"] + r["setup_s"] + r["load_s"] + r["suffix_s"] == pytest.approx(r["kvfs_ttft_s"])


def test_a_layerwise_load_fills_the_kv_space_made_before_the_request(tmp_path):
    """The load's buffers and the cache the model reads are views of a KV
    space allocated before the request (as an engine's KV cache is, at
    start), not allocated inside it; a match longer than the space is refused."""
    from kvfstools.demo_ttft import KvSpace, LayerwiseLoad
    model = build_model("tiny", "cpu")
    layers = model.config.num_hidden_layers
    space = KvSpace(model, 8)
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect() as s:
        keys = [[f"k{b}.L{layer}" for b in range(8)] for layer in range(layers)]
        load = LayerwiseLoad(s, model, keys, 5, "v", space)
        try:
            assert load.bufs.data_ptr() == space.bufs.data_ptr() and load.bufs.shape[1] == 5
            for layer, (k, v) in enumerate(load.stored):
                assert k.data_ptr() == space.k[layer].data_ptr() and v.data_ptr() == space.v[layer].data_ptr()
                assert k.shape[2] == v.shape[2] == 5 * BLOCK_TOKENS
        finally:
            for h in load.hooks:
                h.remove()
        with pytest.raises(ValueError, match="holds 8"):
            LayerwiseLoad(s, model, keys, 9, "v", space)


def test_the_demo_leaves_no_store_behind_and_reports_the_collector(tmp_path, monkeypatch):
    """Without --dir its stores go in a temp dir, removed at the end (they
    were left: 20 GiB a run at 32k and 48k tokens filled a GPU host's disk)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = run_demo(argparse.Namespace(device="cpu", model="tiny", tokens="512", suffix=16, dir=None))
    assert len(res["runs"]) == 2 and all(r["logits_ok"] for r in res["runs"])
    assert res["gc_frozen"] > 0 and gc.get_freeze_count() == 0  # frozen for the run, not after it
    assert all(r["gc_runs"] >= 0 and 0 <= r["gc_max_s"] <= r["gc_s"] for r in res["runs"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_wrong_cache_changes_the_logits(tmp_path, layerwise):
    """The check can fail: other blocks already stored under this prompt's
    keys (the demo's puts then keep them) give other logits."""
    model = build_model("tiny", "cpu")
    cfg = model.config
    _prompt, keys = prompt_and_keys(model, 512, 16)
    per = (2, cfg.num_key_value_heads, BLOCK_TOKENS, cfg.hidden_size // cfg.num_attention_heads)
    if layerwise:
        keys = [f"{k}.L{layer}" for layer in range(cfg.num_hidden_layers) for k in keys]
        shape = per
    else:
        shape = (cfg.num_hidden_layers, *per)
    d = DaemonProcess(tmp_path / "s", capacity="256M", shm_size="64M")
    with d, d.connect() as s:
        wrong = [torch.randn(shape).view(torch.uint8).numpy() for _ in keys]
        s.put_many(keys, wrong, ns="w")
        r = run_ttft(s, model, 512, 16, "cpu", ns="w", layerwise=layerwise)
        assert r["matched_blocks"] == 512 // BLOCK_TOKENS
        assert not logits_agree(r, "cpu"), r


@pytest.mark.parametrize("load", ["whole", "layerwise"])
def test_a_whole_load_is_also_held_to_the_load_then_prefill_bound(load):
    # 1 GB of KV at 10 GB/s is 0.1 s, the suffix 0.05 s, recompute 1 s: the
    # overlapped bound is 1 / max(0.1, 0.05) = 10x; a whole load, which
    # cannot start the prefill before its last block is in, 1 / 0.15 = 6.7x
    from kvfstools.demo_ttft import _against_h2d, _line
    r = {"tier": "T0", "load": load, "tokens": 1024, "matched_blocks": 4, "block_bytes": 250_000_000,
         "blocks": 4, "recompute_s": 1.0, "kvfs_ttft_s": 0.2, "speedup": 5.0, "load_s": 0.12, "rebuild_s": 0.03,
         "suffix_s": 0.05, "suffix_alone_s": 0.05, "max_abs_diff": 0.0, "split_diff": 0.0,
         "same_next_token": True}
    _against_h2d(r, 10e9)
    assert r["bound_speedup"] == pytest.approx(10.0) and r["of_bound"] == pytest.approx(0.5)
    line = _line(r)
    assert "bound 10.0x, 0.50 of it" in line
    if load == "whole":
        assert r["of_seq_bound"] == pytest.approx(5.0 / (1 / 0.15))
        assert "load then prefill: bound 6.7x, 0.75 of it)" in line
    else:
        assert "of_seq_bound" not in r and "load then prefill" not in line
