"""Target language shares of the calibration sample: XVERSE-65B's published pre-training mix."""
from __future__ import annotations

from xvq.calib_data.corpus import CODE, LANGUAGES

# Percent of natural-language pre-training text. en..fr are XVERSE-65B's published figures;
# the tail (its long list of further languages, published without per-language figures here)
# gets small, decreasing, plausible shares in the published order.
PUBLISHED_SHARES = {
    "en": 54.91, "zh": 31.09, "ja": 3.22, "ru": 3.15, "de": 1.52, "es": 0.91, "fr": 0.73,
}
TAIL_SHARES = {
    "pl": 0.54, "it": 0.52, "pt": 0.36, "cs": 0.29, "uk": 0.26, "tr": 0.24, "nl": 0.20,
    "hu": 0.16, "ko": 0.16, "sv": 0.15, "el": 0.14, "fi": 0.12, "id": 0.11, "vi": 0.11,
    "ar": 0.10, "ro": 0.09, "bg": 0.08, "th": 0.07, "da": 0.07, "mr": 0.06, "sk": 0.06,
    "fa": 0.05, "hi": 0.05, "no": 0.05, "ca": 0.04, "iw": 0.04, "lt": 0.04, "ms": 0.03,
    "sl": 0.03, "et": 0.03, "lv": 0.03, "sr": 0.03, "ta": 0.02, "kk": 0.02,
}
CODE_SHARE = 0.07        # of the whole sample
FLOOR_SHARE = 0.0025     # no language below this, so every one reaches the importance matrix


def base_shares() -> dict[str, float]:
    """lang -> fraction of the sample before the floor: natural languages renormalised to
    1 - CODE_SHARE, code CODE_SHARE; sums to 1."""
    raw = {**PUBLISHED_SHARES, **TAIL_SHARES}
    assert set(raw) == set(LANGUAGES), "every XVERSE language needs a share"
    total = sum(raw.values())
    shares = {lang: raw[lang] / total * (1 - CODE_SHARE) for lang in LANGUAGES}
    shares[CODE] = CODE_SHARE
    return shares


def apply_floor(shares: dict[str, float], floor: float = FLOOR_SHARE) -> dict[str, float]:
    """Raise every share below `floor` to it and take the difference proportionally from the
    others (repeated until none of those drops below the floor); the result sums to 1."""
    if floor * len(shares) > 1:
        raise ValueError(f"floor {floor} too high for {len(shares)} languages")
    floored: set[str] = set()
    while True:
        free = {k: v for k, v in shares.items() if k not in floored}
        scale = (1 - floor * len(floored)) / sum(free.values())
        low = {k for k, v in free.items() if v * scale < floor}
        if not low:
            return {k: floor if k in floored else v * scale for k, v in shares.items()}
        floored |= low


def target_shares(floor: float = FLOOR_SHARE) -> dict[str, float]:
    """The sampling targets: base shares with the floor applied among the natural languages
    (code keeps exactly CODE_SHARE); sums to 1."""
    base = base_shares()
    code = base.pop(CODE)
    natural = apply_floor({k: v / (1 - code) for k, v in base.items()}, floor / (1 - code))
    return {**{k: v * (1 - code) for k, v in natural.items()}, CODE: code}
