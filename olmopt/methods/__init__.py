"""Merge methods. ``registry`` is the contract and registry of per-tensor methods; ``delta`` holds them."""
