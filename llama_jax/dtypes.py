"""The floating-point dtypes that command lines name, as numpy dtypes (which JAX accepts)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def parse_dtype(name: str) -> np.dtype:
    """A dtype by its name (one of DTYPES)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
