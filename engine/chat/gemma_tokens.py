"""Gemma's special tokens: the one table the chat runner, the output parser and the tests read."""

from __future__ import annotations

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"  # Gemma 4's turn markers; <turn|> ends a reply
THINK_OPEN, THINK_CLOSE = "<|channel>", "<channel|>"  # <|channel>thought\n...<channel|>
THINK_SWITCH = "<|think|>"  # in the system turn: thinking on
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"  # tool declarations
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
STRING_DELIM = '<|"|>'  # quotes string values inside a tool call
IMAGE_OPEN, IMAGE_CLOSE, IMAGE = "<|image>", "<image|>", "<|image|>"
AUDIO_OPEN, AUDIO_CLOSE, AUDIO = "<|audio>", "<audio|>", "<|audio|>"
VIDEO = "<|video|>"
CHANNEL_NAME = "thought"

# Gemma 4's control tokens, in the order a tokenizer adds them as specials.
GEMMA4_SPECIALS = (
    TURN_OPEN,
    TURN_CLOSE,
    IMAGE_OPEN,
    IMAGE_CLOSE,
    IMAGE,
    AUDIO_OPEN,
    AUDIO_CLOSE,
    AUDIO,
    VIDEO,
    THINK_SWITCH,
    THINK_OPEN,
    THINK_CLOSE,
    TOOL_OPEN,
    TOOL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
    STRING_DELIM,
)

# Gemma 3's turn and image markers (the text-only GGUF path).
GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")

# Control tokens that never reach the client (thinking and tool-call markers are parsed apart).
HIDDEN = tuple(
    t
    for t in (BOS, EOS, PAD, "<mask>", "<unk>", *GEMMA4_SPECIALS, *GEMMA3_SPECIALS)
    if t not in (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
)
