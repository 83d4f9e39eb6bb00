"""Stage 1, loading: FCS files (:mod:`.fcs`), the run's manifest (:mod:`.manifest`) and panel files (:mod:`.panel`).

Everything that reads what a lab hands over lives here, and everything here
refuses bad input with one line that names the file and the problem.
"""
