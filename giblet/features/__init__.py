"""One module per modality: the real work of each preprocessing stage."""
