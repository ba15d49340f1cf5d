"""mlxd: local OpenAI-style chat, embeddings and speech-to-text services on MLX."""

__version__ = "0.1.0"
