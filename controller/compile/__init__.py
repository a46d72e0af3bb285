"""Per-device-class compilation with an accuracy gate (see docs/compile.md).

Entry points: ``controller.compile.api.compile_model`` (in process),
``controller.compile.worker.compile_in_subprocess`` / ``compile_async`` (off the reconcile loop),
``controller.compile.cli.run_compile_command`` (``edgefleet compile``).
"""
