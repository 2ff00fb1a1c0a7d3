"""From a model to a traced graph: symbolic tracing, graph passes, shapes."""
