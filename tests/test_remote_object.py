"""The shared tier's pure parts: the remote object format, names, Redis
Cluster slots, the command-line values (no servers)."""
from __future__ import annotations

import os

import pytest

from kvfs.errors import InvalidArgument
from kvfs.format import checksum
from kvfs.remote_object import (BadObject, check_payload, decode_head, encode_head, head_length, object_name,
                                presence_key, tier_tag)
from kvfs.sizes import parse_age
from kvfsd.presence import command, key_slot, parse_presence_url
from kvfsd.s3_bucket import parse_remote_url
from kvfsd.shared_tier import parse_presence_value, presence_value


def test_a_head_round_trips_and_names_its_object():
    payload = os.urandom(5000)
    head = encode_head("llama.tp1", "k" * 200, len(payload), checksum(payload), b'{"shape":[2,3]}')
    assert len(head) == head_length("llama.tp1", "k" * 200, b'{"shape":[2,3]}')
    h = decode_head(head + payload, "llama.tp1", "k" * 200)
    assert (h.ns, h.key, h.size, h.meta, h.head_len) == ("llama.tp1", "k" * 200, 5000, b'{"shape":[2,3]}', len(head))
    check_payload(h, memoryview(head + payload)[h.head_len:])


@pytest.mark.parametrize("damage", ["magic", "head", "payload", "short", "other-key", "truncated-head"])
def test_a_damaged_or_foreign_object_is_refused(damage):
    payload = os.urandom(3000)
    obj = bytearray(encode_head("ns", "key", len(payload), checksum(payload), None) + payload)
    ns, key = "ns", "key"
    if damage == "magic":
        obj[0] ^= 1
    elif damage == "head":
        obj[40] ^= 1  # inside the fixed fields: the head's own sum catches it
    elif damage == "payload":
        obj[-100] ^= 0x80
    elif damage == "short":
        obj = obj[:-1]
    elif damage == "other-key":
        key = "kez"
    elif damage == "truncated-head":
        obj = obj[:20]
    with pytest.raises(BadObject):
        h = decode_head(obj, ns, key)
        check_payload(h, memoryview(obj)[h.head_len:])


def test_names_spread_over_prefixes_and_keep_tiers_and_namespaces_apart():
    a = object_name("fleet/kv", "ns1", "k")
    assert a.startswith("fleet/kv/") and a.split("/")[2] == a.split("/")[3][:2]
    assert object_name("", "ns1", "k") == a[len("fleet/kv/"):]
    assert object_name("p", "ns1", "k") != object_name("p", "ns2", "k")
    assert presence_key(tier_tag("b", "p"), "ns1", "k") != presence_key(tier_tag("b", "q"), "ns1", "k")
    assert presence_key("t", "ns1", "k") != presence_key("t", "ns2", "k")
    firsts = {object_name("p", "ns", f"k{i}").split("/")[1] for i in range(4000)}
    assert len(firsts) == 256  # every prefix used


def test_key_slot_is_redis_clusters():
    # values from the Redis Cluster specification and redis-cli CLUSTER KEYSLOT
    assert key_slot(b"123456789") == 0x31C3 % 16384
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: the whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")


def test_command_is_resp():
    assert command(b"SET", b"k", b"v") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"


def test_urls_and_ages():
    assert parse_presence_url("redis://127.0.0.1:7000,127.0.0.1:7001") == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
    assert parse_presence_url("valkey://h:1") == [("h", 1)]
    for bad in ("http://h:1", "redis://h", "redis://:5"):
        with pytest.raises(InvalidArgument):
            parse_presence_url(bad)
    assert parse_remote_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_remote_url("s3://bucket") == ("bucket", "")
    with pytest.raises(InvalidArgument):
        parse_remote_url("https://bucket/x")
    assert [parse_age(a) for a in ("90", "90s", "30m", "12h", "7d", "2w")] == [90, 90, 1800, 43200, 604800, 1209600]
    with pytest.raises(ValueError):
        parse_age("soon")
    assert parse_presence_value(presence_value(123, 1700000000.7)) == (123, 1700000000)
    assert parse_presence_value(b"garbage") is None
