"""Where work runs: Ray start-up (`ray`), the unit distributor (`distributor`), checks before any work
(`preconditions`)."""
