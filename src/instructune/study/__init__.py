"""Studies built on training and use: the masked-vs-unmasked comparison and the default job."""
