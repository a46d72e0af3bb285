"""Resource schemas: load edgefleet YAML documents, apply schema defaults, validate them.

One schema serves both deployment shapes: the ``openAPIV3Schema`` in ``manifests/crds/*.yaml``
is what the Kubernetes API server enforces in cluster mode, and what this module enforces
in embedded mode (``edgefleet apply -f``). Callers: the CLI (``edgefleet apply``), the
embedded resource store, and ``controller.crd.source`` (cluster mode, to re-check objects
it reads from the API server).

The CRD files are read from ``manifests/crds`` of a source checkout when present, else from
the copy shipped as package data in ``controller/crd/crds`` (``tests/unit/test_crd_schema.py``
checks that both copies are identical).
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protos.errors import Rejected

GROUP = "edgefleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_MAX_MANIFEST_BYTES = 1024 * 1024  # one YAML file; manifests are small
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

_HERE = Path(__file__).resolve().parent
_REPO_CRDS = _HERE.parent.parent / "manifests" / "crds"
_PACKAGED_CRDS = _HERE / "crds"


@dataclass(frozen=True)
class CrdInfo:
    """What the rest of the controller needs to know about one custom resource kind."""

    kind: str
    plural: str
    singular: str
    namespaced: bool
    schema: dict[str, Any]
    short_names: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        return GROUP

    @property
    def version(self) -> str:
        return VERSION


@dataclass
class LoadedDoc:
    """One YAML document and where it came from (relative ``source.path`` resolves from base_dir)."""

    doc: dict[str, Any]
    source_file: Path
    index: int = 0
    base_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base_dir = self.source_file.resolve().parent

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        meta = self.doc.get("metadata") or {}
        return str(meta.get("name", "")) if isinstance(meta, dict) else ""

    def resolve(self, relative: str) -> Path:
        """Resolve a path written in the document (e.g. ``spec.source.path``) against its file."""
        p = Path(relative)
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def crd_dir() -> Path:
    """The folder holding the CRD YAML files (source checkout first, then package data)."""
    if _REPO_CRDS.is_dir() and any(_REPO_CRDS.glob("*.yaml")):
        return _REPO_CRDS
    return _PACKAGED_CRDS


@functools.lru_cache(maxsize=4)
def _load_crds(folder: str) -> dict[str, CrdInfo]:
    out: dict[str, CrdInfo] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            version = next(v for v in spec["versions"] if v["name"] == VERSION)
            names = spec["names"]
            out[names["kind"]] = CrdInfo(
                kind=names["kind"],
                plural=names["plural"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec["scope"] == "Namespaced",
                schema=version["schema"]["openAPIV3Schema"],
                short_names=tuple(names.get("shortNames", ())),
            )
    if not out:
        raise FileNotFoundError(f"no CustomResourceDefinitions found in {folder}")
    return out


def crds() -> dict[str, CrdInfo]:
    """Kind -> CrdInfo for every edgefleet custom resource."""
    return _load_crds(str(crd_dir()))


def kinds() -> tuple[str, ...]:
    return tuple(crds())


# ---------------------------------------------------------------- loading YAML


def load_documents(
    path: Path, *, max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES
) -> list[LoadedDoc]:
    """Read every YAML document of a file, or of the *.yaml/*.yml files of a folder (not recursive).

    Empty documents are skipped; ``kind: List`` documents are flattened. Raises Rejected on
    unreadable, oversized or non-mapping documents, naming the file. Does not validate.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise Rejected(f"{path}: no such file or folder", reason="not_found")
    out: list[LoadedDoc] = []
    for f in files:
        size = f.stat().st_size
        if size > max_manifest_bytes:
            raise Rejected(f"{f}: {size} bytes is over max_manifest_bytes={max_manifest_bytes}",
                           reason="too_large")
        try:
            docs = list(yaml.safe_load_all(f.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise Rejected(f"{f}: not valid YAML: {e}", reason="bad_yaml") from e
        index = 0
        for doc in docs:
            if doc is None:
                continue
            items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            for item in items or []:
                if not isinstance(item, dict):
                    raise Rejected(f"{f}: document {index} is not a mapping", reason="bad_yaml")
                out.append(LoadedDoc(doc=item, source_file=f, index=index))
                index += 1
    return out


# ---------------------------------------------------------------- defaults


def apply_schema_defaults(value: Any, schema: dict[str, Any]) -> None:
    """Fill missing object properties that have ``default`` (like the API server), in place."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_schema_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    apply_schema_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_schema_defaults(item, schema["items"])


def with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``doc`` with the schema's defaults applied (unknown kinds returned as-is)."""
    out = copy.deepcopy(doc)
    info = crds().get(str(doc.get("kind", "")))
    if info is not None:
        apply_schema_defaults(out, info.schema)
    return out


# ---------------------------------------------------------------- validation


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Copy of a structural schema where unknown fields are errors (kubectl's strict validation)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("items"), dict):
        s["items"] = strict_schema(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    return s


@functools.lru_cache(maxsize=8)
def _validator(kind: str, folder: str) -> Any:
    import jsonschema  # controller extra; imported here so loading YAML needs only pyyaml

    schema = strict_schema(_load_crds(folder)[kind].schema)
    # metadata is checked by hand below (the API server owns most of it)
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _path_str(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _message(err: Any) -> str:
    if err.validator in ("anyOf", "oneOf"):
        branches = err.validator_value
        if all(set(b) == {"required"} for b in branches):
            names = ", ".join(n for b in branches for n in b["required"])
            if err.validator == "oneOf" and "valid under each of" in err.message:
                return f"only one of {names} may be set"
            return f"one of {names} is required"
    if err.validator == "additionalProperties" and err.validator_value is False:
        return err.message.replace("Additional properties are not allowed", "unknown field(s)")
    return str(err.message)


def _label(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"{doc.get('kind') or 'document'} {name or '<unnamed>'}"


def _fail(doc: dict[str, Any], where: str, what: str) -> None:
    raise Rejected(f"{_label(doc)}: {where}: {what}", reason="invalid_resource")


def _check_metadata(doc: dict[str, Any]) -> None:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        _fail(doc, "metadata", "is required and must be a mapping")
        return
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        _fail(doc, "metadata.name", "is required")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        _fail(doc, "metadata.name", f"{name!r} is not a DNS-1123 subdomain "
              "(lowercase letters, digits, '-' and '.', at most 253 characters)")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
        _fail(doc, "metadata.namespace", f"{ns!r} is not a DNS-1123 label")
    for key in ("labels", "annotations"):
        m = meta.get(key)
        if m is not None and (not isinstance(m, dict)
                              or not all(isinstance(v, str) for v in m.values())):
            _fail(doc, f"metadata.{key}", "must map strings to strings")


def _check_cluster_rules(doc: dict[str, Any]) -> None:
    """Cluster mode has no local files: content is pinned by sha256 (pushed with `edgefleet push`)."""
    if doc.get("kind") != "EdgeModel":
        return
    spec = doc.get("spec") or {}
    if "sha256" not in (spec.get("source") or {}):
        _fail(doc, "spec.source.sha256", "is required in cluster mode (push the file with "
              "`edgefleet push` and pin its sha256)")
    samples = (spec.get("validation") or {}).get("samples")
    if samples is not None and "sha256" not in samples:
        _fail(doc, "spec.validation.samples.sha256", "is required in cluster mode")
    for i, v in enumerate(spec.get("variants") or []):
        if "sha256" not in (v.get("source") or {}):
            _fail(doc, f"spec.variants[{i}].source.sha256", "is required in cluster mode")


def _check_semantics(doc: dict[str, Any]) -> None:
    """Rules the OpenAPI schema cannot say."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "EdgeModel":
        seen: set[str] = set()
        for i, t in enumerate(spec.get("targets") or []):
            if t["deviceClass"] in seen:
                _fail(doc, f"spec.targets[{i}].deviceClass", f"{t['deviceClass']!r} is listed twice")
            seen.add(t["deviceClass"])
            precs = t.get("precisions") or []
            if len(set(precs)) != len(precs):
                _fail(doc, f"spec.targets[{i}].precisions", "lists a precision twice")
    elif doc.get("kind") == "EdgeRollout":
        last = 0
        names: set[str] = set()
        for i, w in enumerate(spec.get("waves") or []):
            if w["name"] in names:
                _fail(doc, f"spec.waves[{i}].name", f"{w['name']!r} is used twice")
            names.add(w["name"])
            if "percent" in w:
                if w["percent"] < last:
                    _fail(doc, f"spec.waves[{i}].percent",
                          f"{w['percent']} is lower than an earlier wave's {last} (percent is cumulative)")
                last = w["percent"]


def validate(doc: dict[str, Any], *, cluster: bool = False) -> None:
    """Check one edgefleet resource against its CRD schema; raise Rejected naming the field.

    Defaults are applied before checking (as the API server does). ``cluster=True`` adds the
    cluster-mode rules (content pinned by sha256, no local paths needed).
    """
    if not isinstance(doc, dict):
        raise Rejected("document is not a mapping", reason="invalid_resource")
    api_version = doc.get("apiVersion")
    if api_version != API_VERSION:
        _fail(doc, "apiVersion", f"{api_version!r} is not {API_VERSION!r}")
    kind = doc.get("kind")
    folder = str(crd_dir())
    if kind not in _load_crds(folder):
        _fail(doc, "kind", f"{kind!r} is not one of {sorted(_load_crds(folder))}")
    _check_metadata(doc)
    defaulted = with_defaults(doc)
    errors = sorted(_validator(str(kind), folder).iter_errors(defaulted),
                    key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        where = _path_str(first.absolute_path) or "<root>"
        _fail(doc, where, _message(first) + more)
    _check_semantics(defaulted)
    if cluster:
        _check_cluster_rules(defaulted)
