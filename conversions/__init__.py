"""Converters from upstream checkpoints to the MLX layouts the engine serves.

One module per model family, each with the same shape:

    CONVERTER_VERSION: str
    convert(source, dest, *, quantization=None, group_size=64, dtype=...) -> dict
        Write a model directory the engine's runner for that kind loads. `source` is a local
        Hugging Face directory, or a format the family knows (GGUF file, CTranslate2 directory,
        OpenAI .pt). Returns manifest fields: source_format, dtype, quantization, and anything
        family-specific. Raises common.ConversionError with a clear message.

`install` is the one entry point (`mlxd convert` and `mlxd pull`): it converts into a temporary
directory, runs the serving service's smoke test, writes the one manifest schema
(engine.store.manifest) and moves the result into the store atomically.
"""
