"""The Ray Serve application: OpenAI-compatible ingress, per-GPU engine replicas, the
global admission controller and the token-aware request router.

``import_path: deployments:build_app`` in cluster/*.yaml. ``build_app`` is imported on
first use: ``packserve batch`` and its workers import ``deployments.batch`` without
paying for the Serve application's imports.
"""

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from deployments.app.builder import build_app

        return build_app
    raise AttributeError(f"module 'deployments' has no attribute {name!r}")
