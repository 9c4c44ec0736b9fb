"""The top of ``worker/``: the ``Engine`` (schedule, run, postprocess), its step loop, the
generation and classification APIs, per-step observation, and the executor that runs each
step on one rank or on a tensor-parallel group. Nothing below imports this folder."""
