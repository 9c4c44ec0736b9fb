"""The memory budget: the engine's size limits, the Phase-0 token budget probe, NVML's view
of GPU memory, the budget report and its CLI (``python -m worker.budget.cli``)."""
