"""Stage 6, outputs: the command line (:mod:`.cli`), the HTML report (:mod:`.report`), gating figures (:mod:`.plots`) and the one number formatter (:mod:`.formatting`)."""
