"""Running a merge: the run context, the Dask graph of a run, and the scheduler that runs it."""
