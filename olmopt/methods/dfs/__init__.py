"""Data-flow-space paths: the path type, its maths, the executor, the folded export and the seed's YAML."""
