"""The statistics engine: batch protocol, capture of BN calls, float64 accumulators, the
collection loop, distributed pooling, evaluation."""
