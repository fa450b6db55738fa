"""Images in: the data sets and their splits (``sets``), image decoding and preprocessing with one error
vocabulary (``images``), and the shifted and out-of-distribution sets the gate is judged on (``shift``)."""
