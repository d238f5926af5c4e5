"""Side-by-side benchmarks of turnd against coturn on one machine (see benchmarks/README.md)."""
