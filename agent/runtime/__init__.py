"""Engine backends (one per engine kind) and the hot loader (:mod:`agent.runtime.registry`).

Backends: :mod:`agent.runtime.onnxruntime` (CPU, CUDA EP), :mod:`agent.runtime.tensorrt`,
:mod:`agent.runtime.rknnlite`; they never import each other and are found by engine kind
through :func:`agent.runtime.base.backend_for`.
"""
