"""Stage 4, decisions: reviewer checks (:mod:`.qc`), the screening verdict (:mod:`.eligibility`) and per-subject kinetics (:mod:`.subjects`).

These modules read results (dicts, as stored), never events: a decision can
be remade from the store alone.
"""
