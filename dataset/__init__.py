"""Dataset TOML configuration, media decoding, buckets and the latent / text-encoder caches."""
