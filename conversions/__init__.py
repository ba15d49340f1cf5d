"""Converters from upstream checkpoints to the MLX layouts the engine serves.

One module per model family, each with the same shape:

    CONVERTER_VERSION: str
    convert(source, dest, *, quantization=None, group_size=64, dtype=...) -> dict
        Write a model directory the engine's runner for that kind loads. `source` is a local
        Hugging Face directory, or a format the family knows (GGUF file, CTranslate2 directory,
        OpenAI .pt). Returns manifest fields: source_format, dtype, quantization, and anything
        family-specific. Raises store.ConversionError with a clear message.
    smoke_test(model_dir) -> None
        Load the converted model as the engine does and run one forward pass.
    main(argv=None) -> int
        `python -m conversions.FAMILY SOURCE DEST [-q 4|8] [--group-size N] [--dtype D]`.

`store` installs the result atomically, with a manifest, into the model store.
"""
