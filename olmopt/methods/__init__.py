"""Merge code by merge system: ``delta`` (parameter-space merges, with ``registry``: the contract and
registry of per-tensor methods), ``es`` (evolution strategies), ``fusion`` (depth), ``dfs`` (data-flow paths).
"""
