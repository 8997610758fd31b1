"""The collection engine: token selection and batching, the statistics and their backends, the accumulator,
the run spec, the collect loop, torchrun ranks, store merges and layer features."""
