"""Benchmarks of keras-ham against plain PyTorch, torchvision and TensorFlow (run by
scripts/bench.py). Not part of the installable library: this package knows the repository
layout (../shared/data) and the performance targets."""
