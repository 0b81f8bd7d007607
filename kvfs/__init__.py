"""kvfs: a node-local token warehouse for LLM KV-cache blocks.

    import kvfs
    with kvfs.connect() as store:
        store.put(key, data)
        store.get_into(key, buffer)

Light to import: no trio, lmdb or pyfuse3 here (those are the daemon's).
"""
from . import keys
from .client import Store, connect
from .lookups import Hold, ObjectInfo
from .reservation import Reservation
from .errors import (CapacityError, CorruptionDetected, DaemonUnavailable, InvalidArgument, InvalidKey,
                     KvfsError, MissingDependency, NotFound, PermissionDenied, ProtocolError)

__version__ = "0.1.0"

__all__ = ["connect", "Store", "Hold", "Reservation", "ObjectInfo", "keys", "KvfsError", "NotFound", "InvalidKey", "InvalidArgument",
           "CapacityError", "PermissionDenied", "ProtocolError", "DaemonUnavailable", "CorruptionDetected",
           "MissingDependency", "__version__"]
