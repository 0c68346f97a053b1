"""GPU fast paths. Each kernel sits beside a torch reference, which every other device uses."""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is importable (it comes with torch's CUDA wheels); the kernels also need their inputs on a CUDA device."""
