"""edgefleet resource schemas and Kubernetes cluster mode (the only package that knows Kubernetes).

- ``schema``: load YAML, apply defaults, validate against the CRD openAPIV3Schema (both modes).
- ``source``: cluster mode: list/watch custom resources, call the reconciler, write status.
- ``leader``: Lease-based leader election (coordination.k8s.io/v1).
"""
