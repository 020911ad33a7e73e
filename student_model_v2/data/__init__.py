"""Data layer: AnyText2 JSON records, glyph rendering, JSON offset index, LMDB render cache, datasets."""
