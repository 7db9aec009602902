"""What runs a loaded model: sampling (sampling.py), text streaming (text.py), the decode step's
modes (steps.py, aot.py) and the engine that schedules requests over one KV cache (engine.py)."""
