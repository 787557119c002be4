"""Depth fusion: the chain maths, its application to a loaded model, alphas files, MKA and fitted alphas."""
