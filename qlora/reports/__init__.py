"""Reports on results: quantisation accuracy (`accuracy`, `perplexity`) and plots (`plot`)."""
