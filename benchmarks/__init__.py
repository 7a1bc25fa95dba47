"""Side-by-side benchmarks: each compares corral with the alternative in one process."""
