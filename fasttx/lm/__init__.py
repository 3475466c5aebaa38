"""fasttx.lm: the reference language model's data, training, generation and comparison."""
