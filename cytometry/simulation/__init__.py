"""The simulator and the accuracy harness: not part of the runtime.

:mod:`.simulate` writes FCS tubes with known truth, :mod:`.cohort` a
simulated trial cohort, :mod:`.validation` scores the pipeline against them
per condition, :mod:`.metamorphic` transforms real files (gain changes,
spike-ins, event and channel order) for property tests. Nothing under
``cytometry`` outside this package imports it.
"""
