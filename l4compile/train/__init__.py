"""Training: a fast torch model from the spec, the loss, data, FSDP2 data parallelism and the `train` command."""
