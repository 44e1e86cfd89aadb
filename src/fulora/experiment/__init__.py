"""The experiment runner: stages planned, keyed, run or skipped; the results tables."""
