"""Stage 5, batch and store: a central-lab run over many files (:mod:`.run`) and the HDF5 result store (:mod:`.store`)."""
