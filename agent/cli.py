"""Console script ``edgefleet-agent``: ``run --config FILE``, ``status --config FILE``,
``enroll`` (gets identity and trust root from the controller with a bootstrap token, or
writes a config offline from a given root key: agent/enroll.py).

``run`` starts :class:`agent.app.Agent` and blocks until SIGTERM/SIGINT (systemd stop).
``status`` prints, as JSON, what the persisted state says: committed slots and the update
in progress for each model (works while the agent is stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, load_config


def _setup_logging(level: str, device_id: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [{device_id}] %(name)s: %(message)s")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    _setup_logging(args.log_level or cfg.log_level, cfg.device_id)
    from agent.app import Agent

    agent = Agent(cfg)

    def _stop(signum: int, frame: object) -> None:
        logging.getLogger("agent").info("signal %d: stopping", signum)
        agent._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.start()
    agent.wait()
    agent.stop()
    return 0


def status_dict(cfg: AgentConfig) -> dict[str, Any]:
    """Persisted view of a device: committed slots and updates, per model."""
    from agent.update.slots import SlotStore
    from agent.update.state import StateStore

    slots = SlotStore(cfg.data_path / "models")
    states = StateStore(cfg.data_path / "update").load_all()
    models: dict[str, Any] = {}
    for key in slots.keys():
        active = slots.active(key)
        models[key] = {"active_slot": active.slot if active else None,
                       "version": active.version if active else None,
                       "sha256": active.sha256 if active else None}
    for key, ms in states.items():
        entry = models.setdefault(key, {})
        entry["highest_committed"] = ms.highest_committed
        if ms.current:
            cur = ms.current.to_json()
            cur.pop("envelope_b64", None)
            entry["update"] = cur
    return {"device_id": cfg.device_id, "device_class": cfg.device_class, "models": models}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(json.dumps(status_dict(cfg), indent=2, sort_keys=True))
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enroll import EnrollError, enroll_offline, enroll_online

    out = Path(args.out)
    if args.controller:
        if not args.token:
            raise ConfigError("enroll --controller needs --token (from `edgefleet token create`)")
        if args.tls_ca or args.tls_cert or args.tls_key:
            raise ConfigError("--tls-ca/--tls-cert/--tls-key are for the offline form; "
                              "online enrollment gets its certificate from the controller")
        try:
            cfg = enroll_online(controller_url=args.controller, token=args.token,
                                device_id=args.device_id, device_class=args.device_class,
                                data_dir=args.data_dir, out=out,
                                expected_root=args.root_public_key or "",
                                controller_ca=args.controller_ca)
        except EnrollError as e:
            print(f"edgefleet-agent: enrollment failed: {e}", file=sys.stderr)
            return 1
    elif args.root_public_key:
        if args.token:
            raise ConfigError("--token needs --controller URL")
        cfg = enroll_offline(root_public_key=args.root_public_key, device_id=args.device_id,
                             device_class=args.device_class, data_dir=args.data_dir, out=out,
                             mqtt_host=args.mqtt_host, mqtt_port=args.mqtt_port,
                             mqtt_protocol=args.mqtt_protocol, tls_ca=args.tls_ca,
                             tls_cert=args.tls_cert, tls_key=args.tls_key)
    else:
        raise ConfigError("enroll needs --controller URL --token T (online) or "
                          "--root-public-key KEY (offline)")
    tls = " with a TLS identity" if cfg.mqtt.tls.cert else ""
    print(f"wrote {out} for device {cfg.device_id} (class {cfg.device_class}){tls}; "
          f"MQTT {cfg.mqtt.host}:{cfg.mqtt.port}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-agent", description="edgefleet device agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True)
    run.add_argument("--log-level", default="")
    run.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="print the persisted update/slot state as JSON")
    st.add_argument("--config", required=True)
    st.set_defaults(func=cmd_status)
    en = sub.add_parser(
        "enroll", help="get identity + trust root from the controller with a bootstrap token "
                       "(--controller --token), or write a config offline (--root-public-key)")
    en.add_argument("--device-id", required=True)
    en.add_argument("--device-class", required=True)
    en.add_argument("--controller", default="", help="controller URL, e.g. http://ctl:8080")
    en.add_argument("--token", default="", help="bootstrap token (edgefleet token create)")
    en.add_argument("--controller-ca", default="",
                    help="CA bundle to verify an https:// controller (default: system CAs)")
    en.add_argument("--root-public-key", default="",
                    help="base64 raw Ed25519 root public key, or a file holding it; online: "
                         "refuse a controller whose root differs")
    en.add_argument("--mqtt-host", default="127.0.0.1", help="offline form only")
    en.add_argument("--mqtt-port", type=int, default=1883, help="offline form only")
    en.add_argument("--mqtt-protocol", default="5", choices=["5", "3.1.1"],
                    help="offline form only")
    en.add_argument("--tls-ca", default="", help="offline: CA of the broker certificate")
    en.add_argument("--tls-cert", default="", help="offline: this device's certificate")
    en.add_argument("--tls-key", default="", help="offline: this device's private key")
    en.add_argument("--data-dir", default="/var/lib/edgefleet-agent")
    en.add_argument("--out", default="/etc/edgefleet/agent.yaml")
    en.set_defaults(func=cmd_enroll)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"edgefleet-agent: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
