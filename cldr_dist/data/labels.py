"""Pure functions from ln(IC50) to the normalised label y, its number text and its caption."""
from __future__ import annotations

import math

NUM_NUMBER_TEXTS = 1000  # y rounded to 3 decimals: 0.000 ... 0.999
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATE = "The drug response value between {smiles} and {cell} is "


def y_from_ln_ic50(ln_ic50: float) -> float:
    """GraphDRP's normalisation, y = 1 / (1 + exp(-0.1 * ln_ic50)), in (0, 1)."""
    return 1.0 / (1.0 + math.exp(-0.1 * ln_ic50))


def ln_ic50_from_y(y: float) -> float:
    return 10.0 * math.log(y / (1.0 - y))


def number_index(y: float) -> int:
    """Index of y's number text: y rounded to 3 decimals, times 1000 (0.9996 stays at 999)."""
    return min(int(round(y * 1000)), NUM_NUMBER_TEXTS - 1)


def number_text(index: int) -> str:
    """536 -> 'zero point five three six'."""
    if not 0 <= index < NUM_NUMBER_TEXTS:
        raise ValueError(f"number index {index} outside 0..{NUM_NUMBER_TEXTS - 1}")
    digits = f"{index:03d}"
    return "zero point " + " ".join(DIGIT_WORDS[int(d)] for d in digits)


def index_from_number_text(text: str) -> int:
    words = text.split()
    if len(words) != 5 or words[:2] != ["zero", "point"]:
        raise ValueError(f"not a number text: {text!r}")
    return int("".join(str(DIGIT_WORDS.index(w)) for w in words[2:]))


def all_number_texts() -> list[str]:
    return [number_text(i) for i in range(NUM_NUMBER_TEXTS)]


def caption(smiles: str, cell_name: str) -> str:
    return CAPTION_TEMPLATE.format(smiles=smiles, cell=cell_name)
