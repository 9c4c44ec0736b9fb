"""Model sources: resolve a model spec (hub id, directory, ``packaged:``, ``smoke:``), build
the smoke-test models, load a checkpoint with our attention, classification heads and labels."""
