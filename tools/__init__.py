"""Developer tools (not installed): benchmarks, trace tools and scripts."""
