"""fashion-serve: a Fashion-MNIST classifier served over HTTP."""
