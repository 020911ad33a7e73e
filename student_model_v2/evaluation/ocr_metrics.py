"""Sen.ACC and NED of recognised text lines, following AnyText2's ``eval/eval_dgocr.py``.

The protocol, with every normalisation and why it is there:

* **Sen.ACC** of a line is 1 when the normalised prediction equals the normalised ground truth, else 0
  (AnyText2: ``pred_text == gt_text``).
* **NED** is ``1 - Levenshtein(pred_ids, gt_ids) / max(len(pred_ids), len(gt_ids))`` on character ids,
  1.0 when both are empty. AnyText2 adds 1e-5 to the denominator; the difference is below 1e-5 and
  leaving it out makes hand-computed values exact.
* **Character ids** come from a PP-OCR dictionary: AnyText2 builds ``['sos'] + dictionary + [' ']``
  and maps every character it lacks to the last id, so all out-of-dictionary characters are *one*
  symbol (two different unknown characters compare equal; an unknown one never equals a known one).
  Sen.ACC compares the strings themselves, so there unknown characters keep their identity.
* **Whitespace** (default: removed from both strings). PP-OCR's space output is unreliable: on the
  demo dataset's own images it drops or inserts spaces in 5 % of lines while reading every character
  right, and a space error is a layout question, not glyph legibility. AnyText2 compares raw strings
  with a different recogniser (DuGuang), whose space behaviour is undocumented, so this is a
  deviation for comparability. ``strip_whitespace=False`` keeps spaces.
* **Case** (default: kept, as AnyText2, which is case-sensitive). ``ignore_case=True`` lower-cases
  both strings (``str.lower``, so it only affects scripts with case, i.e. Latin, Greek, Cyrillic).
* Nothing else is normalised: no Unicode folding (full-width vs half-width punctuation counts as an
  error, as in AnyText2), no traditional/simplified mapping.

Lines are grouped by language for the per-language tables: ``Chinese``, ``Chinese_sim`` and
``Chinese_tra`` count as ``Chinese``, other labels as they are. Overall figures average over every
line of every image (AnyText2's averaging), not over languages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ..anytext2.config import MODELS_YAML_DIR

DICT_DIR = MODELS_YAML_DIR / "ocr_dicts"
DICTIONARY_FILES = {"ch": "ppocr_keys_v1.txt", "en": "en_dict.txt"}


@dataclass(frozen=True)
class Normalization:
    """How prediction and ground truth are normalised before they are compared (see the module doc)."""

    strip_whitespace: bool = True
    ignore_case: bool = False

    def apply(self, text: str) -> str:
        if self.strip_whitespace:
            text = "".join(text.split())
        if self.ignore_case:
            text = text.lower()
        return text


class CharDictionary:
    """A PP-OCR character dictionary with AnyText2's id rule (unknown characters share the last id)."""

    def __init__(self, chars: Sequence[str], name: str) -> None:
        table = ["sos", *chars, " "]
        self.name = name
        self.size = len(table)
        self._ids = {char: index for index, char in enumerate(table)}

    @classmethod
    def from_file(cls, path: str | Path) -> "CharDictionary":
        """One character per line; a line holding a single space is the space character."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the OCR dictionary {path}: {exc}") from exc
        if lines and lines[-1] == "":
            lines.pop()
        chars = [line.rstrip("\r") for line in lines]
        if not chars:
            raise ValueError(f"the OCR dictionary {path} is empty")
        return cls(chars, path.name)

    @property
    def unknown_id(self) -> int:
        return self.size - 1

    def ids(self, text: str) -> list[int]:
        return [self._ids.get(char, self.unknown_id) for char in text]

    def __contains__(self, char: str) -> bool:
        return char in self._ids


@lru_cache(maxsize=None)
def load_dictionary(name: str) -> CharDictionary:
    """``'ch'`` (ppocr_keys_v1.txt, AnyText2's Chinese benchmark) or ``'en'`` (en_dict.txt, English)."""
    if name not in DICTIONARY_FILES:
        raise ValueError(f"unknown OCR dictionary {name!r}; expected one of {sorted(DICTIONARY_FILES)}")
    return CharDictionary.from_file(DICT_DIR / DICTIONARY_FILES[name])


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def normalized_edit_similarity(pred: Sequence, gt: Sequence) -> float:
    """``1 - Levenshtein / max(len)``; 1.0 when both sequences are empty."""
    longest = max(len(pred), len(gt))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, gt) / longest


def language_group(language: str) -> str:
    return "Chinese" if language.startswith("Chinese") else language


@dataclass(frozen=True)
class LineScore:
    """One recognised line: raw strings, the normalised ones that were compared, and its scores."""

    language: str
    gt: str
    pred: str
    gt_normalized: str
    pred_normalized: str
    sen_acc: float
    ned: float
    dictionary: str
    gt_unknown_chars: str

    def to_json(self) -> dict:
        return asdict(self)


def score_line(pred: str, gt: str, language: str, dictionary: CharDictionary,
               normalization: Normalization = Normalization()) -> LineScore:
    """Sen.ACC and NED of one prediction against its ground truth (see the module doc)."""
    pred_n, gt_n = normalization.apply(pred), normalization.apply(gt)
    unknown = "".join(dict.fromkeys(char for char in gt_n if char not in dictionary))
    return LineScore(
        language=language_group(language), gt=gt, pred=pred, gt_normalized=gt_n, pred_normalized=pred_n,
        sen_acc=float(pred_n == gt_n), ned=normalized_edit_similarity(dictionary.ids(pred_n), dictionary.ids(gt_n)),
        dictionary=dictionary.name, gt_unknown_chars=unknown,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scores: Iterable[LineScore]) -> dict:
    """``{"overall": {...}, "per_language": {language: {...}}}`` with ``lines``, ``sen_acc``, ``ned`` and
    ``lines_with_unknown_chars`` (ground truth holds characters outside the NED dictionary)."""
    groups: dict[str, list[LineScore]] = {}
    everything: list[LineScore] = []
    for score in scores:
        groups.setdefault(score.language, []).append(score)
        everything.append(score)

    def block(items: list[LineScore]) -> dict:
        return {"lines": len(items), "sen_acc": _mean([s.sen_acc for s in items]), "ned": _mean([s.ned for s in items]),
                "lines_with_unknown_chars": sum(bool(s.gt_unknown_chars) for s in items)}

    return {"overall": block(everything), "per_language": {lang: block(groups[lang]) for lang in sorted(groups)}}
