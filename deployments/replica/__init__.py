"""The replica room: the per-GPU Serve deployment wrapping a worker engine
(``deployment``), the work items the edge sends it (``work``), the stream channel that
carries tokens back (``streams``) and token-based autoscaling (``autoscaling``)."""
