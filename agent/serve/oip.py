"""KServe v2 / Open Inference Protocol (REST) on top of the model registry.

Called by :class:`agent.serve.http.HttpServer` for every request; started through
:func:`agent.serve.start_server` by the agent app. Endpoints:

``GET /v2/health/live``, ``/v2/health/ready``, ``/v2`` (server metadata),
``/v2/models/{name}[/versions/{v}]`` (model metadata), ``.../ready``,
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON tensors and the binary tensor data
extension: ``Inference-Header-Content-Length``, ``parameters.binary_data_size``,
``binary_data`` / ``binary_data_output``), and ``GET /metrics`` (Prometheus text).

Errors: malformed request -> 400, unknown model/version -> 404, body over
``max_request_bytes`` -> 413, busy (concurrency limit queue timeout) -> 503; every error body
is ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.runtime.registry import ModelNotFound, ModelRegistry
from agent.serve.http import Request, Response, error_response, json_response
from protos.edgefleet.v1.common_pb2 import ModelSignature
from protos.errors import EdgefleetError, Rejected, RetryLater

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

SERVER_NAME = "edgefleet-agent"
SERVER_VERSION = "0.1.0"

#: OIP datatype -> numpy dtype name
DATATYPE_NAMES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
#: numpy dtype name -> OIP datatype
DTYPE_NAMES: dict[str, str] = {dt: name for name, dt in DATATYPE_NAMES.items()}
_LITTLE = sys.byteorder == "little"
_TABLES: tuple[Any, dict[str, np.dtype], dict[np.dtype, str]] | None = None


def _numpy() -> tuple[Any, dict[str, np.dtype], dict[np.dtype, str]]:
    """numpy, OIP datatype -> dtype, and dtype -> OIP datatype (dtype objects as keys:
    ``dtype.name`` is slow per request). Built on first use, not at import: the server
    starts with the agent, numpy only comes with the first engine (the backend imports it
    while activating, so a request finds it loaded)."""
    global _TABLES
    tables = _TABLES
    if tables is None:
        import numpy as np

        datatypes = {name: np.dtype(dt) for name, dt in DATATYPE_NAMES.items()}
        tables = _TABLES = (np, datatypes, {dt: name for name, dt in datatypes.items()})
    return tables


class BadRequest(Exception):
    """A malformed inference request (answered with 400)."""


def _datatype(dtype: str) -> str:
    name = DTYPE_NAMES.get(dtype)
    if name is None:  # not a canonical numpy name (signatures use canonical ones)
        np = _numpy()[0]
        name = DTYPE_NAMES.get(np.dtype(dtype).name, "BYTES")
    return name


class OipApp:
    """Routes requests to the registry. One instance per server; thread-safe."""

    def __init__(self, registry: ModelRegistry, *,
                 metrics_text: Callable[[], str] | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.registry = registry
        self._stats = registry.stats
        self._metrics_text = metrics_text
        self._ready = ready or (lambda: True)

    def __call__(self, req: Request) -> Response:
        parts = [p for p in req.path.split("/") if p]
        try:
            if req.method == "POST" and len(parts) >= 4 and parts[-1] == "infer" \
                    and parts[:2] == ["v2", "models"]:
                name, version = _model_path(parts[2:-1])
                return self.infer(name, version, req)
            if req.method not in ("GET", "HEAD"):
                return error_response(405, f"{req.method} is not allowed on {req.path}")
            return self._get(parts)
        except BadRequest as e:
            return error_response(400, str(e))
        except ModelNotFound as e:
            return error_response(404, str(e))
        except RetryLater as e:
            return Response(503, json.dumps({"error": str(e)}).encode(),
                            headers=[("Retry-After", "1")])
        except Rejected as e:
            return error_response(400, str(e))

    # ---- GET endpoints ------------------------------------------------------------------
    def _get(self, parts: list[str]) -> Response:
        if parts == ["v2", "health", "live"]:
            return Response(200, b"{}")
        if parts == ["v2", "health", "ready"]:
            return Response(200, b"{}") if self._ready() else error_response(503, "not ready")
        if parts == ["v2"]:
            return json_response(200, {"name": SERVER_NAME, "version": SERVER_VERSION,
                                       "extensions": ["binary_tensor_data"]})
        if parts == ["metrics"] and self._metrics_text is not None:
            return Response(200, self._metrics_text().encode(),
                            content_type="text/plain; version=0.0.4; charset=utf-8")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            if parts[-1] == "ready":
                name, version = _model_path(parts[2:-1])
                self.registry.describe(name, version)  # raises ModelNotFound -> 404
                return Response(200, b"{}")
            name, version = _model_path(parts[2:])
            info, sig = self.registry.describe(name, version)
            return json_response(200, {
                "name": info.name, "versions": [str(info.version)],
                "platform": f"edgefleet_{info.engine_kind}",
                "inputs": [{"name": t.name, "datatype": _datatype(t.dtype),
                            "shape": list(t.shape)} for t in sig.inputs],
                "outputs": [{"name": t.name, "datatype": _datatype(t.dtype),
                             "shape": list(t.shape)} for t in sig.outputs]})
        return error_response(404, "no such endpoint")

    # ---- inference ----------------------------------------------------------------------
    def infer(self, name: str, version: int | None, req: Request) -> Response:
        started = time.perf_counter()
        header, binary = _split_body(req)
        lease = self.registry.get(name, version)
        ok = False
        batch = 1
        try:
            with lease as engine:
                inputs = _decode_inputs(header, binary, engine.signature)
                try:
                    # batch = rows of the inference this request ran (with dynamic batching,
                    # 0 for requests that rode in another's batch: counts are per execution)
                    outputs, batch = lease.infer(inputs)
                except EdgefleetError:
                    raise
                except Exception as e:
                    log.warning("inference failed model=%s version=%d: %s", name,
                                lease.version, e)
                    return error_response(500, f"inference failed: {e}")
            resp = _encode_outputs(header, outputs, model=lease.name, version=lease.version)
            ok = True
            return resp
        finally:
            self._stats.record(lease.name, lease.version, time.perf_counter() - started,
                               ok=ok, batch_size=batch)


def _model_path(parts: list[str]) -> tuple[str, int | None]:
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions":
        if not parts[2].isdigit():
            raise BadRequest(f"model version must be an integer, got {parts[2][:32]!r}")
        return parts[0], int(parts[2])
    raise ModelNotFound("no such endpoint")


def _split_body(req: Request) -> tuple[dict[str, Any], memoryview]:
    body = req.body
    hlen = req.headers.get("inference-header-content-length")
    if hlen is not None:
        if not hlen.isdigit() or int(hlen) > len(body):
            raise BadRequest("invalid Inference-Header-Content-Length")
        json_part, binary = body[:int(hlen)], memoryview(body)[int(hlen):]
    else:
        json_part, binary = body, memoryview(b"")
    if req.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise BadRequest("compressed request bodies are not supported")
    try:
        header = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise BadRequest("request body must be a JSON object")
    return header, binary


def _decode_inputs(header: dict[str, Any], binary: memoryview,
                   signature: ModelSignature) -> dict[str, np.ndarray]:
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    np, datatypes, _ = _numpy()
    specs = {t.name: t for t in signature.inputs}
    out: dict[str, Any] = {}  # arrays
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise BadRequest("each input must be an object")
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or name not in specs:
            raise BadRequest(f"unknown input {name!r}; the model takes {sorted(specs)}")
        if name in out:
            raise BadRequest(f"input {name!r} given twice")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
        dtype = datatypes.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise BadRequest(f"input {name!r}: unsupported datatype {datatype!r} "
                             f"(supported: {sorted(datatypes)})")
        spec = specs[name]
        if spec.dtype and DTYPE_NAMES.get(spec.dtype) != datatype:
            raise BadRequest(f"input {name!r} is {datatype}, the model expects "
                             f"{_datatype(spec.dtype)}")
        if len(shape) != len(spec.shape) or any(
                s >= 0 and s != d for s, d in zip(spec.shape, shape, strict=False)):
            raise BadRequest(f"input {name!r} has shape {shape}, the model expects "
                             f"{list(spec.shape)} (-1 = any)")
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} exceeds the "
                                 f"binary part ({len(binary) - offset} bytes left)")
            if size != count * dtype.itemsize:
                raise BadRequest(f"input {name!r}: binary_data_size {size} != "
                                 f"{count} elements x {dtype.itemsize} bytes")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            data = item.get("data")
            if data is None:
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError) as e:
                raise BadRequest(f"input {name!r}: data is not a {datatype} tensor: {e}") from e
            if arr.size != count:
                raise BadRequest(f"input {name!r}: {arr.size} values for shape {shape}")
            arr = arr.reshape(shape)
        out[name] = arr
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} trailing bytes after the binary inputs")
    missing = sorted(set(specs) - set(out))
    if missing:
        raise BadRequest(f"missing inputs {missing}")
    return out


def _encode_outputs(header: dict[str, Any], outputs: dict[str, np.ndarray], *, model: str,
                    version: int) -> Response:
    params = header.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) \
        if isinstance(params, dict) else False
    requested = header.get("outputs")
    wanted: list[tuple[str, bool]]
    if requested is None:
        wanted = [(n, default_binary) for n in outputs]
    else:
        if not isinstance(requested, list):
            raise BadRequest("'outputs' must be a list")
        wanted = []
        for item in requested:
            if not isinstance(item, dict) or item.get("name") not in outputs:
                raise BadRequest(f"unknown output {item!r}; the model has {sorted(outputs)}")
            oparams = item.get("parameters") or {}
            binary = oparams.get("binary_data", default_binary) if isinstance(oparams, dict) \
                else default_binary
            wanted.append((item["name"], bool(binary)))
    np, _, dtype_to_oip = _numpy()
    out_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": dtype_to_oip.get(arr.dtype, "BYTES"),
                                 "shape": list(arr.shape)}
        if binary:
            if not _LITTLE or arr.dtype.byteorder == ">":  # the wire format is little-endian
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        out_json.append(entry)
    body = json.dumps({"model_name": model, "model_version": str(version),
                       "id": header.get("id", ""), "outputs": out_json},
                      separators=(",", ":")).encode()
    if not blobs:
        return Response(200, body)
    return Response(200, body + b"".join(blobs), content_type="application/octet-stream",
                    headers=[("Inference-Header-Content-Length", str(len(body)))])
