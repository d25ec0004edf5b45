"""What serves: the in-flight batching engine, its requests, scheduler, paged KV cache, sampler and metrics."""
