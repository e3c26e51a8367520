"""Braid's state layer: the only package that talks to etcd."""

from braid.store.election import Election  # noqa: F401
from braid.store.etcd import (  # noqa: F401
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    Guard,
    GuardFailed,
    NotFound,
    Store,
    StoreError,
    Unavailable,
    parse_endpoints,
)
from braid.store.informer import Informer  # noqa: F401
from braid.store.lease import Lease  # noqa: F401
