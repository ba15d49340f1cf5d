"""Chat service (port 8080): routes (`http`), request parsing (`request`), reply shaping and
streaming (`response`, `output`), the model-thread decode loop (`decode`) and the MLX model
(`runner`, `constraint`)."""
