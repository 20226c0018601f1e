"""Where runs and shards live: a local folder or an object store (pyarrow filesystems), and the run lock."""
