"""The languages Whisper knows: ISO code -> lower-case English name (what verbose_json shows).

Pure data, no MLX: the event loop validates `language` against it. The order is the order of
Whisper's language tokens (multilingual models; large-v3 adds Cantonese at the end).
"""

from __future__ import annotations

_TABLE = """
en english|zh chinese|de german|es spanish|ru russian|ko korean|fr french|ja japanese|
pt portuguese|tr turkish|pl polish|ca catalan|nl dutch|ar arabic|sv swedish|it italian|
id indonesian|hi hindi|fi finnish|vi vietnamese|he hebrew|uk ukrainian|el greek|ms malay|
cs czech|ro romanian|da danish|hu hungarian|ta tamil|no norwegian|th thai|ur urdu|hr croatian|
bg bulgarian|lt lithuanian|la latin|mi maori|ml malayalam|cy welsh|sk slovak|te telugu|
fa persian|lv latvian|bn bengali|sr serbian|az azerbaijani|sl slovenian|kn kannada|et estonian|
mk macedonian|br breton|eu basque|is icelandic|hy armenian|ne nepali|mn mongolian|bs bosnian|
kk kazakh|sq albanian|sw swahili|gl galician|mr marathi|pa punjabi|si sinhala|km khmer|
sn shona|yo yoruba|so somali|af afrikaans|oc occitan|ka georgian|be belarusian|tg tajik|
sd sindhi|gu gujarati|am amharic|yi yiddish|lo lao|uz uzbek|fo faroese|ht haitian creole|
ps pashto|tk turkmen|nn nynorsk|mt maltese|sa sanskrit|lb luxembourgish|my myanmar|bo tibetan|
tl tagalog|mg malagasy|as assamese|tt tatar|haw hawaiian|ln lingala|ha hausa|ba bashkir|
jw javanese|su sundanese|yue cantonese
"""

LANGUAGES: dict[str, str] = dict(
    item.strip().split(" ", 1) for item in _TABLE.replace("\n", "").split("|")
)

# Other names Whisper accepts for a language.
ALIASES: dict[str, str] = {
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}

AUTO = "auto"


def language_code(value: str) -> str | None:
    """The ISO code for a code or an English name (any case); None for auto; else ValueError."""
    text = value.strip().lower()
    if text in ("", AUTO):
        return None
    if text in LANGUAGES:
        return text
    by_name = {name: code for code, name in LANGUAGES.items()} | ALIASES
    if text in by_name:
        return by_name[text]
    raise ValueError(f"unknown language {value!r}: use an ISO 639-1 code such as 'en' or 'auto'")


def language_name(code: str | None) -> str:
    """The lower-case English name whisper-server reports ("english"); the code if unknown."""
    return LANGUAGES.get(code or "", code or "")
