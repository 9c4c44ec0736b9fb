"""The application room: configuration (``config``, ``serve_config``), the builder that
binds the deployments into one Serve application, the CLIs (``cli``, ``serve_cli``,
``kuberay``), Ray's environment (``ray_env``), the Prometheus metrics every deployment
exports (``metrics``) and process memory helpers (``process``)."""
