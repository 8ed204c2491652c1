"""The run-time of one trial: the result file (:mod:`.result`), the stage cache (:mod:`.cache`), the trial itself
(:mod:`.trial`) and tracking (:mod:`.tracking`)."""
