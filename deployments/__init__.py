"""The Ray Serve application: OpenAI-compatible ingress, per-GPU engine replicas, the
global admission controller and the token-aware request router.

``import_path: deployments:build_app`` in cluster/*.yaml.
"""

from deployments.builder import build_app

__all__ = ["build_app"]
