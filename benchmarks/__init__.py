"""Side-by-side benchmarks (`make bench`); results in benchmarks/results/."""
