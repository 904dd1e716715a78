"""Scripts that print figures and ratios (`python -m benchmarks.NAME`); never part of the test suite."""
