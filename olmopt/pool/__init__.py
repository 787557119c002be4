"""Model pool: resolving models, lazy tensor access, the architecture adapter, homology checks."""
