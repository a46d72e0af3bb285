"""The ``edgefleet`` command (console script): run the controller and talk to it.

Subcommands: ``up`` (embedded controller, broker and dashboard: controller/embedded.py),
``apply -f``, ``get``, ``delete``, ``push`` (HTTP client: controller/cli_client.py),
``rollout status|pause|resume|abort|retry|undo`` (controller/cli_rollout.py),
``keys init|rotate|revoke|show`` (controller/ota/keys.py), ``pki init|issue-device|show``
(MQTT certificates, controller/pki.py), ``token create|list|revoke`` (bootstrap tokens for
``edgefleet-agent enroll``, controller/api/enroll.py), ``delta make|apply``
(protos/codecs/cli.py), ``compile`` (controller/compile/cli.py) and ``demo`` (controller/demo.py).
The server URL comes from ``--server``, else ``$EDGEFLEET_SERVER``, else http://127.0.0.1:8080.
Errors print one ``error: ...`` line and exit non-zero; no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from controller.cli_client import ServerError
from protos.errors import EdgefleetError

DEFAULT_DATA_DIR = Path(".edgefleet")


def _server(args: argparse.Namespace) -> str:
    from controller.cli_client import DEFAULT_SERVER

    return str(args.server or os.environ.get("EDGEFLEET_SERVER") or DEFAULT_SERVER)


def _cmd_up(args: argparse.Namespace) -> int:
    from controller.embedded import EmbeddedOptions, run_embedded

    adv_host, _, adv_port = args.advertise_mqtt.rpartition(":") if ":" in \
        args.advertise_mqtt.strip("[]") else (args.advertise_mqtt, "", "")
    if adv_port and not adv_port.isdigit():
        print(f"error: --advertise-mqtt {args.advertise_mqtt}: port must be a number",
              file=sys.stderr)
        return 2
    db_url = args.db_url or os.environ.get("EDGEFLEET_DB_URL", "")
    mqtt: dict[str, Any] = {}
    username = args.mqtt_username or os.environ.get("EDGEFLEET_MQTT_USERNAME", "")
    if username:
        mqtt["mqtt_username"] = username
    if os.environ.get("EDGEFLEET_MQTT_PASSWORD"):
        mqtt["mqtt_password"] = os.environ["EDGEFLEET_MQTT_PASSWORD"]
    for flag, key in (("mqtt_ca", "mqtt_tls_ca"), ("mqtt_cert", "mqtt_tls_cert"),
                      ("mqtt_key", "mqtt_tls_key")):
        if getattr(args, flag):
            mqtt[key] = str(Path(getattr(args, flag)).resolve())
    if (args.mqtt_cert or args.mqtt_key) and not args.mqtt_ca:
        print("error: --mqtt-cert/--mqtt-key need --mqtt-ca", file=sys.stderr)
        return 2
    if args.broker_url.startswith("mqtts://") and not (args.mqtt_ca or args.tls):
        print("error: --broker-url mqtts://... needs --mqtt-ca (the CA of the broker's "
              "certificate)", file=sys.stderr)
        return 2
    if args.lease_seconds < 3:
        print("error: --lease-seconds must be at least 3", file=sys.stderr)
        return 2
    opts = EmbeddedOptions(data_dir=Path(args.data_dir), api_host=args.host, api_port=args.port,
                           mqtt_host=args.mqtt_host, mqtt_port=args.mqtt_port,
                           broker_url=args.broker_url, broker=args.broker, tls=args.tls,
                           advertise_mqtt_host=adv_host, advertise_mqtt_port=int(adv_port or 0),
                           builders_file=Path(args.builders) if args.builders else None,
                           db_url=db_url, replica_id=args.replica_id,
                           keys_dir=Path(args.keys_dir) if args.keys_dir else None,
                           store_dir=Path(args.store_dir) if args.store_dir else None,
                           lease_s=float(args.lease_seconds), settings_overrides=mqtt)
    return run_embedded(opts)


def _cmd_token(args: argparse.Namespace) -> int:
    """``edgefleet token create|list|revoke``: bootstrap tokens (controller/api/enroll.py)."""
    from controller.cli_client import _raise_for, client
    from controller.fleet.enroll import parse_duration_s

    with client(_server(args)) as c:
        if args.action == "create":
            resp = c.post("/api/v1/tokens", json={
                "ttl_s": parse_duration_s(args.ttl), "uses": args.uses,
                "device_class": args.device_class, "id_prefix": args.prefix,
                "reenroll": args.reenroll, "note": args.note})
            _raise_for(resp)
            info = resp.json()
            if args.output == "json":
                print(json.dumps(info, indent=2))
            else:
                print(info["token"])
                print(f"token {info['id']}: {info['uses_left']} use(s), expires "
                      f"{_when(info['expires_ms'])}; shown once, keep it secret",
                      file=sys.stderr)
            return 0
        if args.action == "revoke":
            if not args.token_id:
                print("error: token revoke needs a TOKEN_ID (see edgefleet token list)",
                      file=sys.stderr)
                return 2
            resp = c.delete(f"/api/v1/tokens/{args.token_id}")
            _raise_for(resp)
            print(f"revoked {resp.json()['id']}")
            return 0
        resp = c.get("/api/v1/tokens")
        _raise_for(resp)
        items = resp.json()["items"]
    if args.output == "json":
        print(json.dumps(items, indent=2))
        return 0
    print(f"{'ID':<18}{'STATE':<9}{'USES':<8}{'EXPIRES':<22}{'CLASS':<16}{'PREFIX':<12}NOTE")
    for t in items:
        print(f"{t['id']:<18}{t['state']:<9}{str(t['uses_left']) + '/' + str(t['uses_total']):<8}"
              f"{_when(t['expires_ms']):<22}{t['device_class'] or '*':<16}"
              f"{t['id_prefix'] or '*':<12}{t['note']}")
    return 0


def _when(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def _cmd_pki(args: argparse.Namespace) -> int:
    from controller.pki import CertificateAuthority, cert_common_name

    root = Path(args.pki_dir) if args.pki_dir else Path(args.data_dir) / "pki"
    if args.action == "init":
        ca = CertificateAuthority.init(root, force=args.force)
        print(f"fleet CA created: {ca.ca_cert_path} (key {ca.ca_key_path}, mode 0600)")
        return 0
    ca = CertificateAuthority(root)
    if args.action == "issue-device":
        if not args.name or not args.out:
            print("error: pki issue-device needs DEVICE_ID and --out DIR", file=sys.stderr)
            return 2
        files = ca.device_files(args.name, Path(args.out))
        print(json.dumps({"device_id": args.name, "ca": str(files.ca), "cert": str(files.cert),
                          "key": str(files.key),
                          "agent_config": {"mqtt": {"tls": {"ca": str(files.ca),
                                                            "cert": str(files.cert),
                                                            "key": str(files.key)}}}},
                         indent=2))
    elif args.action == "issue-server":
        hosts = [h for h in (args.name or "").split(",") if h]
        files = ca.write_identity(Path(args.out or root), "server",
                                  *ca.issue_server_cert(hosts))
        print(json.dumps({"hosts": hosts, "cert": str(files.cert), "key": str(files.key)}))
    elif args.action == "issue-controller":
        files = ca.write_identity(Path(args.out or root), "controller",
                                  *ca.issue_controller_cert())
        print(json.dumps({"cn": cert_common_name(files.cert.read_bytes()),
                          "cert": str(files.cert), "key": str(files.key)}))
    else:
        print(json.dumps({"ca": str(ca.ca_cert_path),
                          "subject": ca.ca_cert.subject.rfc4514_string(),
                          "not_after": ca.ca_cert.not_valid_after_utc.isoformat()}, indent=2))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from controller.cli_client import apply

    apply(_server(args), Path(args.filename))
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    from controller.cli_client import get

    get(_server(args), args.what, output=args.output or "", name=args.name or "",
        chunk_size=args.chunk_size)
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from controller.cli_client import delete

    if args.filename:
        from controller.cli_client import load_and_validate

        for ld in load_and_validate(Path(args.filename)):
            ns = (ld.doc.get("metadata") or {}).get("namespace", "default")
            delete(_server(args), ld.kind, ld.name,
                   namespace="" if ld.kind == "DeviceClass" else ns)
        return 0
    if not args.kind or not args.name:
        print("error: give KIND NAME or -f FILE", file=sys.stderr)
        return 2
    delete(_server(args), args.kind, args.name, namespace=args.namespace)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from controller.cli_client import client, push

    with client(_server(args)) as c:
        info = push(c, Path(args.file), kind=args.kind)
    print(info["sha256"])
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from controller.ota.keys import KeyStore

    keys_dir = Path(args.keys_dir) if args.keys_dir else Path(args.data_dir) / "keys"
    if args.action == "init":
        ks = KeyStore.init(keys_dir, force=args.force)
        print(f"keys created in {keys_dir}")
    elif args.action == "rotate":
        ks = KeyStore(keys_dir)
        print(f"new signing key {ks.rotate()}")
    elif args.action == "revoke":
        if not args.key_id:
            print("error: keys revoke needs a KEY_ID", file=sys.stderr)
            return 2
        ks = KeyStore(keys_dir)
        new_id = ks.revoke(args.key_id)
        print(f"revoked {args.key_id}" + (f"; new signing key {new_id}" if new_id else ""))
    else:
        ks = KeyStore(keys_dir)
    print(json.dumps(ks.describe(), indent=2))
    return 0


def _cmd_delta(args: argparse.Namespace) -> int:
    from protos.codecs import cli as codecs_cli

    old = None if args.old == "-" else Path(args.old)
    if args.action == "make":
        info: Any = codecs_cli.delta_make(old, Path(args.new), Path(args.out))
    else:
        info = codecs_cli.delta_apply(old, Path(args.new), Path(args.out),
                                      expected_sha256=args.expected_sha256 or None)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from controller.compile.cli import run_compile_command

    return int(run_compile_command(list(args.rest)))


def _cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(data_dir=Path(args.data_dir), api_port=args.port,
                                exit_when_ready=args.exit_when_ready, timeout_s=args.timeout,
                                agents=args.agents, secure=args.secure,
                                broker=args.broker))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet", description=__doc__.split("\n")[0])
    p.add_argument("--server", help="controller URL (default $EDGEFLEET_SERVER or "
                                    "http://127.0.0.1:8080)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run controller + MQTT broker + dashboard on this machine")
    up.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    up.add_argument("--host", default="127.0.0.1", help="API/dashboard listen address")
    up.add_argument("--port", type=int, default=8080, help="API/dashboard port")
    up.add_argument("--mqtt-host", default="127.0.0.1")
    up.add_argument("--mqtt-port", type=int, default=1883, help="0 = a free port")
    up.add_argument("--broker-url", default="", help="use this broker, start none")
    up.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    up.add_argument("--tls", action="store_true",
                    help="broker with TLS, per-device certificates and ACL (needs mosquitto)")
    up.add_argument("--advertise-mqtt", default="", metavar="HOST[:PORT]",
                    help="broker address given to enrolling boards (default: --mqtt-host and "
                         "the broker's port); with --tls it is added to the server certificate")
    up.add_argument("--builders", default="", metavar="FILE",
                    help="trusted remote builders JSON {id: base64 public key}: start the "
                         "build dispatcher (docs/builder.md)")
    # replicas (docs/scaling.md): several `up` sharing one database, broker, keys and store
    up.add_argument("--db-url", default="", metavar="URL",
                    help="shared database, e.g. postgresql+psycopg://user@host/edgefleet "
                         "(default $EDGEFLEET_DB_URL, else SQLite in --data-dir); with it this "
                         "process is a replica: leader election by a database lease, only "
                         "the leader reconciles")
    up.add_argument("--replica-id", default="", metavar="ID",
                    help="this replica's name in the lease (default HOSTNAME-PID; a stable "
                         "one lets a restarted replica take its own lease back at once)")
    up.add_argument("--lease-seconds", type=float, default=15.0, metavar="S",
                    help="leader lease: a dead leader is replaced within S seconds "
                         "(renewed every S/3)")
    up.add_argument("--keys-dir", default="", metavar="DIR",
                    help="signing keys (default DATA_DIR/keys); replicas share one")
    up.add_argument("--store-dir", default="", metavar="DIR",
                    help="artifact store (default DATA_DIR/store); replicas share one")
    up.add_argument("--mqtt-username", default="",
                    help="MQTT username for --broker-url (default $EDGEFLEET_MQTT_USERNAME; "
                         "the password comes from $EDGEFLEET_MQTT_PASSWORD)")
    up.add_argument("--mqtt-ca", default="", metavar="PEM",
                    help="CA of the broker's TLS certificate (for --broker-url mqtts://...)")
    up.add_argument("--mqtt-cert", default="", metavar="PEM",
                    help="client certificate for the broker (with --mqtt-key)")
    up.add_argument("--mqtt-key", default="", metavar="PEM", help="client certificate's key")
    up.set_defaults(func=_cmd_up)

    tk = sub.add_parser("token", help="bootstrap tokens for `edgefleet-agent enroll`: "
                                      "create | list | revoke TOKEN_ID")
    tk.add_argument("action", choices=["create", "list", "revoke"])
    tk.add_argument("token_id", nargs="?")
    tk.add_argument("--ttl", default="24h", help="create: lifetime (3600, 15m, 24h, 7d)")
    tk.add_argument("--uses", type=int, default=1, help="create: enrollments allowed")
    tk.add_argument("--device-class", default="", help="create: only this device class")
    tk.add_argument("--prefix", default="", help="create: only device ids with this prefix")
    tk.add_argument("--reenroll", action="store_true",
                    help="create: may enroll a device id the controller already knows")
    tk.add_argument("--note", default="", help="create: free text shown by list")
    tk.add_argument("-o", "--output", choices=["json"])
    tk.set_defaults(func=_cmd_token)

    pk = sub.add_parser("pki", help="MQTT certificates: init | issue-device ID --out DIR | "
                                    "issue-server HOST[,HOST] | issue-controller | show")
    pk.add_argument("action", choices=["init", "issue-device", "issue-server",
                                       "issue-controller", "show"])
    pk.add_argument("name", nargs="?", help="device id, or comma-separated broker hosts")
    pk.add_argument("--out", default="", help="folder for the key, certificate and ca.pem")
    pk.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    pk.add_argument("--pki-dir", default="", help="default DATA_DIR/pki")
    pk.add_argument("--force", action="store_true", help="init: replace an existing CA")
    pk.set_defaults(func=_cmd_pki)

    ap = sub.add_parser("apply", help="create or update resources from YAML")
    ap.add_argument("-f", "--filename", required=True, help="file or folder of YAML")
    ap.set_defaults(func=_cmd_apply)

    g = sub.add_parser("get", help="list devices, models, rollouts or events")
    g.add_argument("what", help="devices | models | rollouts | events")
    g.add_argument("name", nargs="?", help="one object (device id, or [namespace/]name)")
    g.add_argument("-o", "--output", choices=["json", "wide"])
    g.add_argument("--chunk-size", type=int, default=500, metavar="N",
                   help="devices: fetch the list N per request (0 = all in one request)")
    g.set_defaults(func=_cmd_get)

    d = sub.add_parser("delete", help="delete a resource")
    d.add_argument("kind", nargs="?", help="edgemodel | edgerollout | deviceclass")
    d.add_argument("name", nargs="?")
    d.add_argument("-n", "--namespace", default="default")
    d.add_argument("-f", "--filename", help="delete the objects named in this YAML")
    d.set_defaults(func=_cmd_delete)

    from controller.cli_rollout import add_rollout_parser

    add_rollout_parser(sub)   # rollout status|pause|resume|abort|retry|undo

    pu = sub.add_parser("push", help="upload a file to the artifact store; prints its sha256")
    pu.add_argument("file")
    pu.add_argument("--kind", default="model", choices=["model", "samples"])
    pu.set_defaults(func=_cmd_push)

    k = sub.add_parser("keys", help="signing keys: init | rotate | revoke KEY_ID | show")
    k.add_argument("action", choices=["init", "rotate", "revoke", "show"])
    k.add_argument("key_id", nargs="?")
    k.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    k.add_argument("--keys-dir", default="", help="default DATA_DIR/keys")
    k.add_argument("--force", action="store_true", help="init: replace existing keys")
    k.set_defaults(func=_cmd_keys)

    de = sub.add_parser("delta", help="make or apply an OTA delta")
    de.add_argument("action", choices=["make", "apply"])
    de.add_argument("old", help="base file ('-' for none: a full artifact)")
    de.add_argument("new", help="make: target file; apply: the delta")
    de.add_argument("out")
    de.add_argument("--expected-sha256", default="",
                    help="apply: refuse a delta made for another target")
    de.set_defaults(func=_cmd_delta)

    c = sub.add_parser("compile", help="compile a model for a device class (see compile --help)",
                       add_help=False)
    c.add_argument("rest", nargs=argparse.REMAINDER)
    c.set_defaults(func=_cmd_compile)

    sub.add_parser("cluster", help="run the controller in a Kubernetes cluster (see cluster --help)",
                   add_help=False)
    sub.add_parser("builder", help="run a remote engine builder (see builder run --help)",
                   add_help=False)

    dm = sub.add_parser("demo", help="controller + broker + dashboard + 3 real agents")
    dm.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR / "demo"))
    dm.add_argument("--port", type=int, default=8080, help="dashboard port (0 = free port)")
    dm.add_argument("--agents", type=int, default=3)
    dm.add_argument("--exit-when-ready", action="store_true",
                    help="exit 0 once all agents serve (non-zero after --timeout)")
    dm.add_argument("--timeout", type=float, default=300.0, help="seconds to reach all serving")
    dm.add_argument("--secure", action="store_true",
                    help="TLS broker, a certificate per agent, device ACL (needs mosquitto)")
    dm.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    dm.set_defaults(func=_cmd_demo)
    return p


# Subcommands with their own argument parser: everything after the name goes to them
# untouched (argparse.REMAINDER cannot pass options such as --help or --config=... through).
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "compile": ("controller.compile.cli", "run_compile_command"),
    "cluster": ("controller.cluster", "run_cluster"),
    "builder": ("controller.cli", "_builder_command"),
}


def _builder_command(argv: list[str]) -> int:
    """``edgefleet builder run ...``: a remote engine builder (controller/builder/program.py)."""
    if argv[:1] != ["run"]:
        print("usage: edgefleet builder run --id ID --engine-kind KIND --controller URL "
              "--mqtt HOST:PORT --root-pub KEY  (see: edgefleet builder run --help)",
              file=sys.stderr)
        return 2
    from controller.builder.program import run_builder

    return run_builder(argv[1:])


def _passthrough(argv: list[str]) -> int | None:
    target = PASSTHROUGH.get(argv[0]) if argv else None
    if target is None:
        return None
    import importlib

    func = getattr(importlib.import_module(target[0]), target[1])
    return int(func(list(argv[1:])))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rc = _passthrough(argv)
    if rc is not None:
        return rc
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command not in ("up", "demo"):
        logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:
        for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "aiomqtt"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"error: cannot reach the controller at {_server(args)}: {e}", file=sys.stderr)
        return 1
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
