"""``braid pki ...``: the cluster CA, service and user certificates (braid.auth.pki).

Works on a PKI directory (``--dir``, else ``$BRAID_PKI_DIR``, else
``/etc/braid/pki``) on the machine that holds the CA key; it does not talk
to the cluster. Exit codes as ``braid``: 1 the directory does not allow it
(no CA, rotation state), 2 bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys
from pathlib import Path

from braid.auth import pki


def _err(msg: str) -> None:
    print(f"braid: {msg}", file=sys.stderr)


def _handled(fn):
    """PkiError -> exit 1, ValueError (bad names, roles, addresses) -> exit 2."""
    @functools.wraps(fn)
    def run(args) -> int:
        try:
            return fn(args)
        except pki.PkiError as exc:
            _err(str(exc))
            return 1
        except ValueError as exc:
            _err(str(exc))
            return 2
    return run


def pki_dir(args) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else pki.default_pki_dir()


def _rel(path: Path, d: Path) -> str:
    try:
        return str(path.relative_to(d))
    except ValueError:
        return str(path)


def _expiry(not_before: dt.datetime, not_after: dt.datetime) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    day = f"{not_after:%Y-%m-%d}"
    if not_after <= now:
        return f"{day} (EXPIRED)"
    if not_before > now:
        return f"{day} (not valid before {not_before:%Y-%m-%d %H:%M})"
    left = not_after - now
    return f"{day} (in {left.days}d)" if left.days else f"{day} (in {left.seconds // 3600}h)"


def _files(tls: pki.TlsFiles) -> None:
    print(f"  certificate: {tls.cert}")
    print(f"  key:         {tls.key}  (0600, keep it secret)")
    print(f"  CA bundle:   {tls.ca}")


@_handled
def cmd_init(args) -> int:
    d = pki_dir(args)
    existed = (d / pki.CA_CERT).exists() and (d / pki.CA_KEY).exists()
    pki.init_ca(d, cluster=args.cluster, days=args.days, force=args.force)
    ca = pki.load_ca(d)
    if existed and not args.force:
        print(f"A CA already exists in {d} (cluster {ca.cluster!r}, valid until "
              f"{ca.cert.not_valid_after_utc:%Y-%m-%d}); kept it.")
        print("  (--force replaces it: every certificate issued so far stops being trusted; "
              "`braid pki rotate` changes it without that)")
        return 0
    print(f"{'Replaced' if existed else 'Created'} the CA of cluster {ca.cluster!r} in {d}:")
    print(f"  {d / pki.CA_CERT}  trust bundle: give it to every node and user")
    print(f"  {d / pki.CA_KEY}  CA key (0600): keep it here, nowhere else")
    print(f"Valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}.")
    print("Next: braid pki issue-service NODE SERVICE --dns HOST --ip ADDR (for each service of each node);"
          " braid pki issue-user NAME --role admin")
    return 0


@_handled
def cmd_issue_service(args) -> int:
    d = pki_dir(args)
    tls = pki.issue_service(d, args.node, args.service, dns_names=args.dns or (), ips=args.ip or (),
                            days=args.days)
    info = next(i for i in pki.list_certs(d) if i.path == tls.cert)
    print(f"Issued service:{info.name} (SANs {', '.join(info.sans)}; valid until {info.not_after:%Y-%m-%d}):")
    _files(tls)
    print(f"Install them on {args.node} as {pki.DEFAULT_PKI_DIR}/{pki.NODES}/{args.node}/{args.service}.crt|.key,"
          f" with {pki.CA_CERT} in {pki.DEFAULT_PKI_DIR}/ (a running {args.service} picks up new files "
          "by itself).")
    return 0


@_handled
def cmd_issue_user(args) -> int:
    d = pki_dir(args)
    tls = pki.issue_user(d, args.name, args.role, days=args.days)
    info = next(i for i in pki.list_certs(d) if i.path == tls.cert)
    print(f"Issued user:{args.name} with role {args.role} (valid until {info.not_after:%Y-%m-%d}):")
    _files(tls)
    print(f"Give the three files to {args.name}, over a channel you trust.")
    return 0


@_handled
def cmd_rotate(args) -> int:
    d = pki_dir(args)
    if args.finish:
        pki.finish_rotation(d, force=args.force)
        ca = pki.load_ca(d)
        print(f"CA rotation finished: {d / pki.CA_CERT} trusts only {pki.common_name(ca.cert)!r}.")
        print("Copy it to every node and user; certificates of the previous CA are refused from then on.")
        return 0
    pki.rotate_ca(d, days=args.days)
    ca = pki.load_ca(d)
    print(f"CA rotation started: {pki.common_name(ca.cert)!r} signs from now on; {d / pki.CA_CERT} trusts it "
          f"and {', '.join(repr(pki.common_name(c)) for c in ca.previous)}.")
    print("Next:")
    print(f"  1. copy {d / pki.CA_CERT} to every node and user (running services reload it by themselves);"
          f" {d / pki.CA_KEY} is the new CA's key")
    print(f"  2. braid pki renew --dir {d}   (re-issues every certificate with the new CA),"
          " then distribute them")
    print(f"  3. braid pki rotate --finish --dir {d}")
    return 0


@_handled
def cmd_renew(args) -> int:
    d = pki_dir(args)
    done = pki.renew_certs(d, within=dt.timedelta(days=args.within), days=args.days, everything=args.all)
    if not done:
        print(f"Nothing to renew in {d} (every certificate is signed by the current CA and valid for "
              f"more than {args.within} days).")
        return 0
    print(f"Re-issued {len(done)} certificate(s) in {d}:")
    for path, why in done:
        print(f"  {_rel(path, d)}  ({why})")
    print("Distribute them to their nodes and users.")
    return 0


COLUMNS = ("KIND", "NAME", "ROLE", "NODE", "EXPIRES", "ISSUER", "PATH")


@_handled
def cmd_list(args) -> int:
    d = pki_dir(args)
    rows = pki.list_certs(d)
    if args.output == "json":
        print(json.dumps([{"path": str(r.path), "kind": r.kind, "name": r.name, "subject": r.subject,
                           "role": r.role, "node": r.node, "serial": f"{r.serial:x}",
                           "not_before": r.not_before.isoformat(), "not_after": r.not_after.isoformat(),
                           "expired": r.expired, "issuer": r.issuer, "issuer_current": r.issuer_current,
                           "sans": list(r.sans)} for r in rows], indent=2))
        return 0
    table = [list(COLUMNS)] + [[r.kind, r.name, r.role or "-", r.node or "-",
                                _expiry(r.not_before, r.not_after), r.issuer, _rel(r.path, d)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    print("\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table))
    stale = [r for r in rows if r.kind != "ca" and not r.issuer_current]
    if stale:
        print(f"\n{len(stale)} certificate(s) not signed by the current CA: braid pki renew", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """``braid pki`` and its actions, under the subparsers ``sub`` of ``braid``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", metavar="DIR", default=None,
                        help=f"PKI directory (env {pki.PKI_DIR_ENV}; default {pki.DEFAULT_PKI_DIR})")

    pp = sub.add_parser("pki", help="the cluster CA and the certificates of services and users (mutual TLS)")
    psub = pp.add_subparsers(dest="pki_command", metavar="ACTION")

    sp = psub.add_parser("init", parents=[common], help="make the cluster CA (keeps an existing one)")
    sp.add_argument("--cluster", default="braid", help="cluster name, recorded in the CA (default braid)")
    sp.add_argument("--days", type=int, default=3650, help="validity of the CA (default 3650)")
    sp.add_argument("--force", action="store_true",
                    help="replace an existing CA (every certificate issued so far stops being trusted)")
    sp.set_defaults(fn=cmd_init)

    sp = psub.add_parser("issue-service", parents=[common],
                         help="issue (or re-issue) the certificate of a service on a node")
    sp.add_argument("node")
    sp.add_argument("service", choices=pki.SERVICES)
    sp.add_argument("--dns", action="append", metavar="NAME",
                    help="a host name clients dial (SAN); repeatable")
    sp.add_argument("--ip", action="append", metavar="ADDR",
                    help="an address clients dial (SAN); repeatable")
    sp.add_argument("--days", type=int, default=365, help="validity (default 365)")
    sp.set_defaults(fn=cmd_issue_service)

    sp = psub.add_parser("issue-user", parents=[common], help="issue (or re-issue) a user's client certificate")
    sp.add_argument("name")
    sp.add_argument("--role", required=True, choices=pki.ROLES)
    sp.add_argument("--days", type=int, default=365, help="validity (default 365)")
    sp.set_defaults(fn=cmd_issue_user)

    sp = psub.add_parser("rotate", parents=[common],
                         help="start a CA rotation (both CAs trusted), or end it with --finish")
    sp.add_argument("--finish", action="store_true", help="trust only the new CA from now on")
    sp.add_argument("--force", action="store_true",
                    help="with --finish: even if certificates of the previous CA are left")
    sp.add_argument("--days", type=int, default=3650, help="validity of the new CA (default 3650)")
    sp.set_defaults(fn=cmd_rotate)

    sp = psub.add_parser("renew", parents=[common],
                         help="re-issue certificates that expire soon or are signed by a previous CA")
    sp.add_argument("--all", action="store_true", help="every certificate, whatever its expiry and CA")
    sp.add_argument("--within", type=int, default=30, metavar="DAYS",
                    help="renew what expires within DAYS (default 30)")
    sp.add_argument("--days", type=int, default=365, help="validity of the new certificates (default 365)")
    sp.set_defaults(fn=cmd_renew)

    sp = psub.add_parser("list", parents=[common], help="the CA and every certificate, with expiry")
    sp.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sp.set_defaults(fn=cmd_list)

    pp.set_defaults(fn=lambda a: (pp.print_help(), 2)[1])
