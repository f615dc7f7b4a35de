"""Developer tools: install/run/test scripts, benchmarks and the offline data builders (not imported by the library)."""
