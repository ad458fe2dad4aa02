"""Training: build the run (`build`), the loop (`loop`), the optimiser and schedule (`optim`),
checkpoints (`checkpoint`) and metrics (`metrics`)."""
