"""The engine core: the configuration, the ``Engine`` and its step loop, requests, errors,
per-step observation, and the out-of-memory rules every other folder shares."""
