"""Offline training of the Fashion-MNIST classifiers: `python -m training --help`."""
