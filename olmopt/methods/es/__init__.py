"""Evolution strategies (SVD-ES, norm-ES): the pure, replayable steps (``maths``)."""
