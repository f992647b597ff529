"""`prfaas certs`: a cluster's CA and a key and certificate per identity, for a real deployment.

    prfaas certs --out DIR --cluster NAME --node router:router --node cachepool:cachepool \
        --node prefill:prefill-prfaas-0@10.0.1.5,prefill0.example --node decode:decode-local-0 \
        --node frontdoor:frontdoor --node client:alice --node admin:ops

Each `--node KIND:ID[@HOST,...]` writes DIR/ID.crt and DIR/ID.key (0600), the certificate naming
`prfaas://NAME/KIND/ID` (prefill, decode and convertible nodes are all kind `worker`: a node's role
may change, its identity does not) and valid for the hosts given. The first run makes the CA
(DIR/ca.crt, DIR/ca.key); later runs reuse it: run again for the same ID to rotate its certificate
(the services load a rotated certificate on their next handshake). Copy ca.crt and a service's own
ID.crt / ID.key to it (`--tls-dir`), never ca.key.
"""

from __future__ import annotations

import json
from pathlib import Path

from prfaas.security.identity import KINDS
from prfaas.settings import command_parser, positive_int

ALIASES = {"prefill": "worker", "decode": "worker", "convertible": "worker", "node": "worker"}


def parse_node(text: str) -> tuple[str, str, list[str]]:
    """`KIND:ID[@HOST,HOST]` -> (kind, id, hosts)."""
    who, _, hosts = text.partition("@")
    kind, sep, name = who.partition(":")
    kind = ALIASES.get(kind, kind)
    if not sep or not name or kind not in KINDS:
        raise ValueError(f"--node {text!r}: give KIND:ID[@HOST,...], KIND one of "
                         f"{', '.join(sorted({*KINDS, *ALIASES}))}")
    if "/" in name or name in ("ca", ".lock"):
        raise ValueError(f"--node {text!r}: {name!r} cannot be an identity's name")
    return kind, name, [h for h in hosts.split(",") if h]


def certs_command(argv: list[str]) -> int:
    from prfaas.security import pki

    p = command_parser("prfaas certs", __doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the directory (made if missing; the CA is made on first use)")
    p.add_argument("--cluster", default="prfaas", help="the cluster's trust domain, in every identity's URI")
    p.add_argument("--node", action="append", default=[], help="KIND:ID[@HOST,...], repeated")
    p.add_argument("--days", type=positive_int, default=365, help="validity of the certificates made now")
    a = p.parse_args(argv)
    try:
        nodes = [parse_node(n) for n in a.node]
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    made_ca = not (out / "ca.crt").exists()
    if made_ca:
        pki.write_ca(out, a.cluster)
    elif pki.ca_domain(out) != a.cluster:
        p.error(f"{out}/ca.crt is the CA of cluster {pki.ca_domain(out)!r}, not {a.cluster!r}")
    issued = [str(pki.issue(out, kind, name, hosts, a.days)) for kind, name, hosts in nodes]
    print(json.dumps({"dir": str(out), "cluster": a.cluster, "new_ca": made_ca, "issued": issued}))
    return 0
