"""Random well-framed requests (any op, any argument shapes) and random raw
bytes: the daemon always answers or closes, and keeps serving."""
import socket
import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvfs import protocol as P
from helpers import recv_reply

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=30), st.binary(max_size=40))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=12)
arg_names = st.sampled_from(["ns", "keys", "key", "items", "lease", "leases", "put", "sums", "sync",
                             "limit", "after", "seq", "version"])
requests = st.tuples(st.integers(1, 2**31), st.sampled_from(sorted(P.OPS) + ["bogus"]),
                     st.dictionaries(arg_names, values, max_size=5))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(reqs=st.lists(requests, min_size=1, max_size=5), junk=st.binary(max_size=64))
def test_random_requests_never_hurt_the_daemon(daemon_for_fuzz, reqs, junk):
    d, store = daemon_for_fuzz
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.socket))
    s.settimeout(10)
    try:
        for rid, op, args in reqs:
            if op == P.PUT:
                continue  # a put's reply waits for its trailer; covered in test_bad_input
            body = msgpack.packb([rid, op, args], use_bin_type=True)
            s.sendall(struct.pack("<4sIQ", P.MAGIC, len(body), 0) + body)
            r = recv_reply(s)
            assert r is not None and r[0] in (rid, 0) and r[1] in (P.STATUS_OK, P.STATUS_ERR)
        s.sendall(junk)  # then garbage: an error or a close, never a hang of others
    finally:
        s.close()
    assert store.get("canary-9d2e", ns="zz-canary-7f3a") == b"still here"
