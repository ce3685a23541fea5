"""The policy service: the annotator and generator runtimes, and their thin gRPC servicer."""
