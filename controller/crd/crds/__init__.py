"""Package data: a copy of manifests/crds/*.yaml, so an installed controller finds its schemas."""
