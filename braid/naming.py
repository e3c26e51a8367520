"""How Braid names things on a host, in one place: libvirt domains, bridges,
taps, VXLAN devices, router namespaces and their legs, the anycast gateway
MAC, and the Braid metadata element of a domain. Pure functions; every
service that creates or finds a host object uses these (never a format
string of its own), so the node agent, netd and the tooling agree.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET

from braid.validation import NAME_RE

XMLNS = "https://braid.dev/xmlns/vm/1"
IFNAMSIZ = 15  # usable characters of a Linux interface name
ROUTER_NS_PREFIX = "braid-r-"
_READABLE_NIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


def short_hash(*parts: str, n: int = 8) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def vxlan_name(vni: int) -> str:
    return f"vx-{vni}"


def router_netns(router: str) -> str:
    return ROUTER_NS_PREFIX + router


def gateway_mac(router: str) -> str:
    """The anycast gateway MAC of a router: the same on every node,
    locally administered (0e: never a port MAC, those are 02:62:...)."""
    h = short_hash("gateway-mac", router, n=10)
    return "0e:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))


def leg_names(router: str, network: str) -> tuple[str, str]:
    """(outer leg in the node's namespace, enslaved to the bridge; inner leg
    in the router's namespace)."""
    h = short_hash("leg", router, network)
    return f"rl-{h}", f"rg-{h}"


def domain_name(vm_name: str) -> str:
    if not vm_name or not NAME_RE.match(vm_name):
        raise ValueError(f"metadata.name: not a valid VM name: {vm_name!r}")
    return f"braid-{vm_name}"


def bridge_name(network: str) -> str:
    """``br-<network>`` when it fits in IFNAMSIZ, else ``br-<3 chars>_<hash>``
    (network names never contain '_': the two forms cannot collide)."""
    if not network or not NAME_RE.match(network):
        raise ValueError(f"network: not a valid network name: {network!r}")
    name = f"br-{network}"
    return name if len(name) <= IFNAMSIZ else f"br-{network[:3]}_{short_hash('bridge', network)}"


def tap_name(vm: str, nic: str) -> str:
    """``bt-<vm>_<nic>`` when it fits, else ``bt-<3 chars of vm>-<hash>``. Only
    the short form contains '_' (VM names cannot), so the forms are disjoint."""
    domain_name(vm)
    if not nic:
        raise ValueError("nic.name: required (it names the tap device)")
    name = f"bt-{vm}_{nic}"
    if len(name) <= IFNAMSIZ and _READABLE_NIC.match(nic):
        return name
    return f"bt-{vm[:3]}-{short_hash('tap', vm, nic)}"


def parse_braid_metadata(xml: str) -> dict:
    """Braid's ``<metadata>``: {"name", "uid", "generation", "node"}, or {}. Takes a whole
    domain (dumpxml), the ``<braid:vm>`` element, or what ``dom.metadata(ELEMENT, XMLNS)``
    returns (that element with its namespace stripped by libvirt)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"xml: not well-formed: {exc}") from None
    tag = f"{{{XMLNS}}}vm"
    el = root if root.tag in (tag, "vm") else root.find(f"metadata/{tag}")
    if el is None:
        return {}
    generation = el.get("generation") or "0"
    if not re.fullmatch(r"-?[0-9]+", generation):
        raise ValueError(f"generation: not an integer: {generation!r}")
    return {"name": el.get("name", ""), "uid": el.get("uid", ""), "generation": int(generation),
            "node": el.get("node", "")}
