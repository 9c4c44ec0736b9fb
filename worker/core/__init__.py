"""The bottom of ``worker/``: the configuration, the errors, requests and their limits,
the device, the out-of-memory rules and step timing. It imports no other folder of
``worker/`` (``tests/worker/test_import_graph.py`` checks the folders' order)."""
