"""Stage 1, loading: FCS files (:mod:`.fcs`), the run's manifest (:mod:`.manifest`), panel files (:mod:`.panel`)
and a reviewer's corrected gates (:mod:`.reviewed_gates`).

Everything that reads what a lab hands over lives here, and everything here
refuses bad input with one line that names the file and the problem.
"""
