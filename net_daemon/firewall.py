"""The distributed firewall: security groups rendered to one nftables table
per node, applied as one atomic ``nft -f`` batch.

Every frame between a port and anything else (another port, the VXLAN
device, a router leg) crosses the bridge ``forward`` hook, so one chain
there dispatches to per-port chains:

- ``eg-<port>`` (from the port): anti-spoofing (its MAC, its IPs; DHCP
  discovery from 0.0.0.0), then established/related, then the groups'
  egress rules. A port whose groups have no egress rule may send anything.
- ``in-<port>`` (to the port): established/related, DHCP answers, the
  groups' ingress rules, then drop: default deny for a port with groups.

Stateful through conntrack in the bridge family. A rule with a remote
group matches a named set ``sg-<group>-v4``/``-v6`` holding the addresses of
that group's ports (cluster-wide): a membership change rewrites the set,
not the rules (``Ruleset.set_update``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass, field

from braid.v1 import network_pb2
from net_daemon.model import LocalPort, Snapshot, port_ips

TABLE = "braid"


@dataclass
class Ruleset:
    chains: str                  # the filter table (inet) without set elements
    sets: dict[str, list[str]] = field(default_factory=dict)   # set name -> addresses
    marks: str = ""              # the port-marking table (bridge)

    @property
    def digest(self) -> str:
        """Of the rules and the set names, not the set contents: those change
        in place (set_update) without a new table."""
        h = hashlib.sha256(self.chains.encode() + b"\0" + self.marks.encode())
        for name in sorted(self.sets):
            h.update(f"\0{name}".encode())
        return h.hexdigest()[:16]

    def full_batch(self) -> str:
        """Replace both tables in one atomic batch (conntrack keeps the flows)."""
        lines = []
        for fam in ("bridge", "inet"):
            lines += [f"table {fam} {TABLE}", f"delete table {fam} {TABLE}"]
        lines += [f"table bridge {TABLE} {{", self.marks, "}",
                  f"table inet {TABLE} {{", f'  comment "{self.digest}"', self.chains]
        lines += [self._set_decl(name) for name in sorted(self.sets)]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _set_decl(self, name: str) -> str:
        typ = "ipv6_addr" if name.endswith("-v6") else "ipv4_addr"
        elems = self.sets[name]
        body = f"type {typ}; flags interval;" + (f" elements = {{ {', '.join(elems)} }}" if elems else "")
        return f"  set {name} {{ {body} }}"

    def set_update(self, old: "Ruleset | None") -> str | None:
        """A batch that only rewrites the sets that changed, when the rules
        are the same; None when the rules changed (use full_batch). With
        ``old`` None (the table in the kernel has our digest but its set
        contents are unknown): rewrite every set."""
        if old is not None and (old.chains != self.chains or old.marks != self.marks
                                or old.sets.keys() != self.sets.keys()):
            return None
        lines = []
        for name in sorted(self.sets):
            if old is None or self.sets[name] != old.sets[name]:
                lines.append(f"flush set inet {TABLE} {name}")
                if self.sets[name]:
                    lines.append(f"add element inet {TABLE} {name} {{ {', '.join(self.sets[name])} }}")
        return "\n".join(lines) + "\n" if lines else ""


def _family(rule: network_pb2.SecurityGroupRule) -> str:
    return "ip6" if rule.ethertype.lower() == "ipv6" else "ip"


def _l4(rule: network_pb2.SecurityGroupRule, fam: str) -> str:
    proto = (rule.protocol or "any").lower()
    if proto in ("any", ""):
        return ""
    if proto == "icmp":
        return "meta l4proto icmpv6" if fam == "ip6" else "meta l4proto icmp"
    out = f"meta l4proto {proto}"
    if rule.port_min or rule.port_max:
        lo, hi = rule.port_min or 1, rule.port_max or rule.port_min
        out += f" {proto} dport {lo}" + (f"-{hi}" if hi != lo else "")
    return out


def _rule(rule: network_pb2.SecurityGroupRule, peer: str, verdict: str) -> str | None:
    """One allowing rule; ``peer`` is saddr (ingress) or daddr (egress)."""
    fam = _family(rule)
    parts = [f"meta nfproto {'ipv6' if fam == 'ip6' else 'ipv4'}"]
    if rule.remote_group:
        parts.append(f"{fam} {peer} @sg-{rule.remote_group}-{'v6' if fam == 'ip6' else 'v4'}")
    elif rule.remote_cidr:
        net = ipaddress.ip_network(rule.remote_cidr, strict=False)
        if (net.version == 6) != (fam == "ip6"):
            return None
        if net.prefixlen:
            parts.append(f"{fam} {peer} {net}")
    l4 = _l4(rule, fam)
    if l4:
        parts.append(l4)
    return " ".join(parts) + " " + verdict


def render(snap: Snapshot, ports: dict[str, LocalPort]) -> Ruleset:
    sets: dict[str, list[str]] = {}
    for g in sorted(snap.groups):
        v4, v6 = [], []
        for p in snap.ports.values():
            if g in p.spec.security_groups:
                for ip in port_ips(p):
                    (v6 if ":" in ip else v4).append(ip)
        sets[f"sg-{g}-v4"] = sorted(set(v4), key=ipaddress.ip_address)
        sets[f"sg-{g}-v6"] = sorted(set(v6), key=ipaddress.ip_address)

    marks_in, marks_out, dispatch, chains = [], [], [], []
    for i, name in enumerate(sorted(ports), start=1):
        lp = ports[name]
        marks_in.append(f'    iifname "{lp.tap}" meta mark set 0x{i:08x}')
        marks_out.append(f'    oifname "{lp.tap}" meta mark set meta mark | 0x{i << 16:08x}')
        dispatch.append(f"    meta mark & 0x0000ffff == 0x{i:08x} jump eg-{name}")
        dispatch.append(f"    meta mark & 0xffff0000 == 0x{i << 16:08x} jump in-{name}")
        groups = [snap.groups[g] for g in lp.groups if g in snap.groups]
        # a rule naming a group that does not exist (any more) allows nothing
        rules = [r for g in groups for r in g.spec.rules
                 if not r.remote_group or r.remote_group in snap.groups]
        ingress = [x for r in rules if r.direction == network_pb2.INGRESS
                   for x in [_rule(r, "saddr", "accept")] if x]
        egress = [x for r in rules if r.direction == network_pb2.EGRESS
                  for x in [_rule(r, "daddr", "return")] if x]
        v4 = [ip for ip in lp.ips if ":" not in ip]
        v6 = [ip for ip in lp.ips if ":" in ip]
        # egress chains *return* what they allow: the destination port's chain decides next
        eg = [f"    ether saddr != {lp.mac} drop",
              "    meta nfproto ipv4 ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
              "    meta nfproto ipv4 " + (f"ip saddr != {{ {', '.join(v4)} }} drop" if v4 else "drop"),
              "    meta nfproto ipv6 " + (f"ip6 saddr != {{ {', '.join(v6)}, fe80::/10 }} drop" if v6
                                          else "ip6 saddr != fe80::/10 drop"),
              "    ct state established,related return",
              "    ct state invalid drop"]
        eg += [f"    {r}" for r in egress] + (["    drop"] if egress else [])
        ing = ["    ct state established,related accept",
               "    ct state invalid drop",
               "    meta nfproto ipv4 udp sport 67 udp dport 68 accept",
               "    meta l4proto icmpv6 accept"]   # neighbour discovery
        if groups:
            ing += [f"    {r}" for r in ingress] + ["    drop"]
        chains.append(f"  chain eg-{name} {{\n" + "\n".join(eg) + "\n  }")
        chains.append(f"  chain in-{name} {{\n" + "\n".join(ing) + "\n  }")
    head = ("  chain forward {\n    type filter hook forward priority 0; policy accept;\n"
            + "".join(d + "\n" for d in dispatch) + "  }")
    marks = ("  chain mark-in {\n    type filter hook prerouting priority -300; policy accept;\n"
             + "".join(m + "\n" for m in marks_in) + "  }\n"
             "  chain mark-out {\n    type filter hook forward priority -300; policy accept;\n"
             + "".join(m + "\n" for m in marks_out) + "  }")
    return Ruleset(chains="\n".join([head, *chains]), sets=sets, marks=marks)


class NftError(RuntimeError):
    pass


def nft(batch: str, nft_bin: str = "nft") -> None:
    """Apply one batch atomically (all or nothing)."""
    r = subprocess.run([nft_bin, "-f", "-"], input=batch, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise NftError(f"nft failed: {r.stderr.strip()[:2000]}")


def applied_digest(nft_bin: str = "nft") -> str:
    """The digest (comment) of the table now in the kernel, '' if none."""
    r = subprocess.run([nft_bin, "list", "table", "inet", TABLE], capture_output=True, text=True,
                       timeout=30)
    if r.returncode:
        return ""
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("comment "):
            return line.split('"')[1] if '"' in line else ""
    return ""


def remove(nft_bin: str = "nft") -> None:
    for fam in ("bridge", "inet"):
        subprocess.run([nft_bin, "delete", "table", fam, TABLE], capture_output=True, timeout=30)
