"""Bottom-layer I/O: URIs and fsspec file systems, atomic writes, versioned manifests."""
