"""wgpy benchmarks. Every figure is reported next to a reference measured in the same run."""
