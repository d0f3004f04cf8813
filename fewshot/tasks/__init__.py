"""Task distributions: what a task is, how tasks are sampled and split."""
