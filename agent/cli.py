"""Console script ``edgefleet-agent``: ``run --config FILE``, ``status --config FILE``,
``enroll`` (writes a config file that pins the fleet's root key).

``run`` starts :class:`agent.app.Agent` and blocks until SIGTERM/SIGINT (systemd stop).
``status`` prints, as JSON, what the persisted state says: committed slots and the update
in progress for each model (works while the agent is stopped).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, ConfigError, config_to_dict, load_config


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
    root = Path(args.root_public_key).read_bytes() if Path(args.root_public_key).is_file() \
        else base64.b64decode(args.root_public_key)
    if len(root) != 32:  # a file may hold base64 text
        root = base64.b64decode(root.strip())
    data: dict[str, Any] = {
        "device_id": args.device_id, "device_class": args.device_class,
        "data_dir": args.data_dir,
        "mqtt": {"host": args.mqtt_host, "port": args.mqtt_port},
        "trust": {"root_public_key": base64.b64encode(root).decode()},
    }
    from agent.config import config_from_dict

    cfg = config_from_dict(data)  # validates
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = config_to_dict(cfg)
    out.write_text(yaml.safe_dump(full, sort_keys=False))
    print(f"wrote {out} for device {cfg.device_id} (class {cfg.device_class})")
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
    en = sub.add_parser("enroll", help="write a config pinning the fleet root key")
    en.add_argument("--device-id", required=True)
    en.add_argument("--device-class", required=True)
    en.add_argument("--root-public-key", required=True,
                    help="base64 raw Ed25519 root public key, or a file holding it")
    en.add_argument("--mqtt-host", default="127.0.0.1")
    en.add_argument("--mqtt-port", type=int, default=1883)
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
