"""From a graph to a Plan: error sites, owners, wiring, scope, placement."""
