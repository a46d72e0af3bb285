"""Reconcile functions: a resource dict and a context in, a status dict out.

They know neither Kubernetes nor the embedded Resource table: ControllerCore (embedded)
and controller.crd.source (cluster) fetch resources, call them, and write the status back.
"""
