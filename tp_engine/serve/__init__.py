"""An OpenAI-compatible HTTP server on the tensor-parallel group (``tp-engine serve``).

- :mod:`.protocol`: request checking, response bodies, OpenAI error JSON, streamed text;
- :mod:`.lockstep`: rank 0's per-step decision, broadcast to every rank and applied alike;
- :mod:`.scheduler`: rank 0's admission, engine loop and token delivery;
- :mod:`.app`: the FastAPI app (rank 0);
- :mod:`.metrics`: Prometheus metrics;
- :mod:`.liveness`: noticing a lost rank;
- :mod:`.server`: putting it together for the CLI.
"""
