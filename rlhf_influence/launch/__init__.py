"""What the recipes and benchmarks share to start a job: flags and their checks, models and GGUF
files, rewards, the memory check, and the group-sampling recipe."""
