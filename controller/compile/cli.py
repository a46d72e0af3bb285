"""``edgefleet compile MODEL.onnx --class CLASS [--precision int8,fp16,fp32]
[--validation SAMPLES.npz] [--metric M --budget B] --out DIR``.

``run_compile_command(argv)`` is wired into the ``edgefleet`` CLI by controller/cli.py. It
compiles in this process (a CLI has no loop to protect), copies the shipped engine to
``DIR/<model>.<class>.<precision>.<ext>``, writes ``DIR/<model>.<class>.report.json`` and prints
the JSON report on stdout; progress and errors go to stderr.
``--class`` is a built-in class name (cpu-x86-64, cpu-aarch64, jetson-orin, rk3588) or a
DeviceClass YAML/JSON file (``metadata.name`` + ``spec``, as applied with kubectl).

Exit codes: 0 shipped, 1 no precision passed the gate, 2 bad input, 3 toolchain unavailable,
4 other failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from controller.compile.api import AllPrecisionsRejected, compile_model
from controller.compile.deviceclass import (
    BUILTIN_DEVICE_CLASSES,
    AccuracySpec,
    DeviceClassSpec,
    get_device_class,
)
from protos.errors import BackendUnavailable, EdgefleetError, Rejected
from protos.fsutil import atomic_writer, write_atomic

MAX_CLASS_FILE_BYTES = 1024 * 1024
ENGINE_SUFFIX = {"onnxruntime-cpu": ".onnx", "tensorrt": ".engine", "rknn": ".rknn"}


def _load_class(value: str) -> DeviceClassSpec:
    if value in BUILTIN_DEVICE_CLASSES:
        return get_device_class(value)
    path = Path(value)
    if not path.is_file():
        raise Rejected(f"--class {value!r} is neither a built-in class "
                       f"({', '.join(sorted(BUILTIN_DEVICE_CLASSES))}) nor a file",
                       reason="unknown_device_class")
    if path.stat().st_size > MAX_CLASS_FILE_BYTES:
        raise Rejected(f"{path} is over {MAX_CLASS_FILE_BYTES} bytes", reason="bad_device_class")
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise Rejected(f"{path}: not YAML/JSON: {e}", reason="bad_device_class") from e
    if not isinstance(doc, dict) or doc.get("kind", "DeviceClass") != "DeviceClass":
        raise Rejected(f"{path}: expected a DeviceClass resource", reason="bad_device_class")
    name = str((doc.get("metadata") or {}).get("name") or path.stem)
    return DeviceClassSpec.from_spec(doc.get("spec") or {}, name=name)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgefleet compile",
                                 description="Compile an ONNX model for a device class with an "
                                             "accuracy gate; prints the JSON report.")
    ap.add_argument("model", type=Path, help="ONNX model file")
    ap.add_argument("--class", dest="device_class", required=True,
                    help="built-in device class name or DeviceClass YAML file")
    ap.add_argument("--precision", default="int8,fp16,fp32",
                    help="precisions to try in order; the first passing the gate ships")
    ap.add_argument("--validation", type=Path, default=None,
                    help="npz of validation samples ('inputs' or one array per input, "
                         "optional 'labels')")
    ap.add_argument("--metric", default="top1-agreement",
                    choices=["top1-drop", "top1-agreement", "max-abs-error", "relative-error"])
    ap.add_argument("--budget", type=float, default=0.99)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def run_compile_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    def err(msg: str) -> None:
        print(f"edgefleet compile: {msg}", file=sys.stderr)

    try:
        dc = _load_class(args.device_class)
        accuracy = AccuracySpec(metric=args.metric, budget=args.budget)
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        work = out / f".work-{args.model.stem}-{dc.name}"
        report = compile_model(args.model, device_class=dc, precisions=precisions,
                               validation=args.validation, accuracy=accuracy, work_dir=work,
                               progress=None if args.quiet else err)
        suffix = ENGINE_SUFFIX.get(report.engine_kind, ".bin")
        engine = out / f"{args.model.stem}.{dc.name}.{report.precision}{suffix}"
        with open(report.engine_path, "rb") as src, atomic_writer(engine) as dst:
            shutil.copyfileobj(src, dst)
        report.engine_path = str(engine)
        text = json.dumps(report.to_dict(), indent=2, sort_keys=True)
        write_atomic(out / f"{args.model.stem}.{dc.name}.report.json", (text + "\n").encode())
        shutil.rmtree(work, ignore_errors=True)
        print(text)
        return 0
    except AllPrecisionsRejected as e:
        err(str(e))
        print(json.dumps({"error": str(e), "rejected": e.rejected}, indent=2))
        return 1
    except BackendUnavailable as e:
        err(str(e))
        return 3
    except Rejected as e:
        err(str(e))
        return 2
    except EdgefleetError as e:
        err(str(e))
        return 4


def main() -> int:  # pragma: no cover - thin wrapper
    return run_compile_command(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
