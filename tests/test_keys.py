import subprocess
import sys

import pytest

from kvfs import InvalidKey
from kvfs.keys import block_hashes, normalize_key, normalize_ns


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\x00b", "x" * 201, "tab\there", "\n", 5, None, b""])
def test_invalid_keys(bad):
    with pytest.raises(InvalidKey):
        normalize_key(bad)


def test_valid_keys():
    assert normalize_key("abc") == "abc"
    assert normalize_key("x" * 200) == "x" * 200
    assert normalize_key(b"\x00\xffA") == "00ff41"
    assert normalize_key("ключ с пробелом") == "ключ с пробелом"
    with pytest.raises(InvalidKey):
        normalize_key(b"\x01" * 101)  # hex form over 200 chars
    assert normalize_ns("llama3-8b.tp1.bf16") == "llama3-8b.tp1.bf16"
    with pytest.raises(InvalidKey):
        normalize_ns("n" * 101)


def test_block_hashes_chain_and_partial_blocks():
    toks = list(range(100))
    h = block_hashes(toks, block_size=16)
    assert len(h) == 6  # 100 // 16; the partial tail has no key
    assert len(set(h)) == 6 and all(len(x) == 32 for x in h)
    # a prefix shares its keys; a change in block 2 changes keys from 2 on
    assert block_hashes(toks[:40], 16) == h[:2]
    changed = toks.copy()
    changed[40] = 999
    h2 = block_hashes(changed, 16)
    assert h2[:2] == h[:2] and all(a != b for a, b in zip(h2[2:], h[2:]))
    # continuing from a parent equals hashing the whole sequence
    assert block_hashes(toks[32:], 16, parent=h[1]) == h[2:]
    # salt separates models
    assert block_hashes(toks, 16, salt=b"model-b")[0] != h[0]


def test_block_hashes_stable_across_processes():
    code = "from kvfs.keys import block_hashes; print(','.join(block_hashes(list(range(64)), 16, salt=b's')))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip() for seed in (1, 2)}
    assert outs == {",".join(block_hashes(list(range(64)), 16, salt=b"s"))}


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=210), st.sampled_from([".", "..", "a/b", "", "x" * 200, "ok"]),
                          st.binary(max_size=3)), max_size=6))
def test_batch_key_check_agrees_with_the_per_key_rules(keys):
    """normalize_keys' fast path accepts exactly what normalize_key accepts."""
    from kvfs import InvalidKey
    from kvfs.keys import normalize_key, normalize_keys
    try:
        expect = [normalize_key(k) for k in keys]
    except InvalidKey:
        expect = None
    try:
        got = normalize_keys(keys)
    except InvalidKey:
        got = None
    assert got == expect
