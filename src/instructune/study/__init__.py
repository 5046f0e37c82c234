"""Studies built on training and use: the masked-vs-unmasked comparison, the instruction-weight sweep
(`instructune study`) and the default job."""
