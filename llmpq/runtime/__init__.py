"""llmpq.runtime: run a plan with one process per stage (`launch` -> `stage` -> `schedule`)."""
