"""JSON that strict parsers accept: NaN and infinities become null, numpy and pandas values plain ones."""

from __future__ import annotations

import json
import math
from pathlib import Path


def plain(value):
    """``value`` with numpy/pandas scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:
        pass
    return str(value)


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` of :func:`plain` ``value`` with ``allow_nan=False``: never NaN in what we write."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)
