"""Where bytes live and how they move: the object-store contract and its local and S3 stores, store and source locations, and HTTP downloads."""
