"""The AnyText2 training dataset, under the name the original toolkit used.

The implementation lives in :mod:`student_model_v2.data.dataset` (batch contract in docs/data.md); this
module keeps ``from student_model_v2.dataset_anytext_v2 import AnyTextDataset, collate_fn`` working.
"""

from student_model_v2.data.dataset import (
    LINE_STR_KEYS,
    LINE_TENSOR_KEYS,
    SAMPLE_TENSOR_KEYS,
    STR_KEYS,
    AnyTextDataset,
    MockAnyTextDataset,
    SampleBuilder,
    collate_fn,
    make_splits,
)

__all__ = [
    "AnyTextDataset", "MockAnyTextDataset", "SampleBuilder", "collate_fn", "make_splits",
    "SAMPLE_TENSOR_KEYS", "LINE_TENSOR_KEYS", "LINE_STR_KEYS", "STR_KEYS",
]
