"""Pure tensor maths for merging: tensors in, tensors out, deterministic given a seed."""
