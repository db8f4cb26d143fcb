"""Images -> WebDataset shards on Ray, the shard manifest, and the streaming reader."""
