"""A small Llama-architecture engine in plain torch with a paged KV cache (issue 6): the
reference the disaggregated demo and the tests run, and what the block-copy kernels serve."""
