"""Embeddings service (port 8081): routes (`http`), request parsing (`request`), the
model-thread batching policy (`decode`) and the MLX encoder (`runner`)."""
