"""Ray jobs over data: filtering, download, pre-tokenization, and the token shard format."""
