"""The etcd key layout: every key and prefix Braid reads or writes, built and
parsed here and nowhere else (relative to the cluster prefix, e.g. ``/braid/``).

Kind first, so one watch on ``<kind>/`` sees spec and status of a kind in
revision order (docs/architecture.md, "State in etcd")::

    <kind>/spec/<name>                 metadata + spec (the API; the binder for vm bindings)
    <kind>/status/<name>               status (the owner)
    node/live/<node>/<daemon>          a daemon's presence, bound to its lease
    election/<name>                    leader key, bound to the leader's lease
    ipam/vni/<vni>                     a network's VNI claim
    ipam/ip/<subnet>/<ip>              an address claim (value: the port)
    ipam/mac/<mac>                     a MAC claim (value: the port)
    net/vtep/<node>                    a node's tunnel address (netd)
    extent/<volume>/<index:06d>        an extent record; extent/@<snapshot>/... a snapshot's
    storage/quiesce/<volume>           hold the volume's writes (snapshot, revert)
    storage/quiesced/<volume>/<node>   a storage daemon holds them now
    storage/usage/<node>               allocated bytes per replica of a node
    storage/rebuild/<node>             rebuild progress of a node
    auth/tokens/<sha256>               an API token (its hash only)
    audit/<ts>-<rand>                  an audit record (7-day lease)
    scheduler/status/leader            the scheduler leader's heartbeat
    drs/recommendations                the last DRS round

Builders return keys; parsers return the parts or None for a key of another
shape (etcd contents written by someone else must not crash a reader).
"""

from __future__ import annotations

# -- objects of a kind -------------------------------------------------------


def kind_prefix(kind: str) -> str:
    return f"{kind}/"


def spec_prefix(kind: str) -> str:
    return f"{kind}/spec/"


def status_prefix(kind: str) -> str:
    return f"{kind}/status/"


def spec(kind: str, name: str) -> str:
    return f"{kind}/spec/{name}"


def status(kind: str, name: str) -> str:
    return f"{kind}/status/{name}"


def parse_object(key: str) -> tuple[str, str, str] | None:
    """``<kind>/spec|status/<name>`` -> (kind, "spec"|"status", name)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[1] not in ("spec", "status") or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]


# -- daemons, leaders ----------------------------------------------------------

LIVE = "node/live/"


def live_prefix(node: str = "") -> str:
    """All presence keys, or one node's (``node/live/<node>/``)."""
    return f"{LIVE}{node}/" if node else LIVE


def live(node: str, daemon: str) -> str:
    return f"{LIVE}{node}/{daemon}"


def parse_live(key: str) -> tuple[str, str] | None:
    """``node/live/<node>/<daemon>`` -> (node, daemon)."""
    if not key.startswith(LIVE):
        return None
    parts = key[len(LIVE):].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


ELECTION = "election/"


def election(name: str) -> str:
    return f"{ELECTION}{name}"


SCHEDULER = "scheduler/"
SCHEDULER_LEADER = f"{SCHEDULER}status/leader"
DRS = "drs/"
DRS_RECOMMENDATIONS = f"{DRS}recommendations"

# -- network -------------------------------------------------------------------

VNI = "ipam/vni/"
MAC = "ipam/mac/"
IP = "ipam/ip/"
VTEP = "net/vtep/"


def vni(value: int) -> str:
    return f"{VNI}{value}"


def mac(address: str) -> str:
    return f"{MAC}{address}"


def ip_prefix(subnet: str) -> str:
    return f"{IP}{subnet}/"


def ip(subnet: str, address: str) -> str:
    return f"{IP}{subnet}/{address}"


def vtep(node: str) -> str:
    return f"{VTEP}{node}"


# -- storage -------------------------------------------------------------------

EXTENT = "extent/"
SNAPSHOT_MARK = "@"   # extent/@<snapshot>/<index>: a snapshot's records (names never contain '@')
QUIESCE = "storage/quiesce/"
QUIESCED = "storage/quiesced/"
USAGE = "storage/usage/"
REBUILD = "storage/rebuild/"


def extent_prefix(volume: str = "") -> str:
    return f"{EXTENT}{volume}/" if volume else EXTENT


def extent(volume: str, index: int) -> str:
    return f"{EXTENT}{volume}/{index:06d}"


def parse_extent(key: str) -> tuple[str, int] | None:
    """``extent/<volume>/<index>`` -> (volume, index)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != EXTENT or not parts[1] or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def quiesce(volume: str) -> str:
    return f"{QUIESCE}{volume}"


def quiesced_prefix(volume: str) -> str:
    return f"{QUIESCED}{volume}/"


def quiesced(volume: str, node: str) -> str:
    return f"{QUIESCED}{volume}/{node}"


def usage(node: str) -> str:
    return f"{USAGE}{node}"


def rebuild(node: str) -> str:
    return f"{REBUILD}{node}"


def node_of(prefix: str, key: str) -> str | None:
    """The last segment of a per-node key (``storage/usage/<node>`` ...)."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    return rest if rest and "/" not in rest else None


# -- security ------------------------------------------------------------------

TOKENS = "auth/tokens/"
AUDIT = "audit/"


def token(digest: str) -> str:
    return f"{TOKENS}{digest}"


def audit(record_id: str) -> str:
    return f"{AUDIT}{record_id}"
