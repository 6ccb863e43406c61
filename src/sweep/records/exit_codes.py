"""The exit status of `python -m sweep`: one meaning each."""

EXIT_OK = 0  # every job measured or skipped
EXIT_JOB_FAILED = 1  # at least one job failed; the others are measured, all are logged (or spooled)
EXIT_REFUSED = 2  # refused before any job ran (bad configuration, unreachable store): nothing was logged
EXIT_INCOMPLETE = 3  # the sweep could not finish, e.g. the store was lost and the spool could not be written
