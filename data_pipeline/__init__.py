"""Dataset sources -> `.beton` files (FFCV) -> loaders for SSL views, weak augmentation and eval."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Run a block that may call FFCV's `Compiler.set_num_threads(n)`; keep torch's thread count.

    FFCV calls it when ffcv is first imported (n=1), when a Loader is built and when an epoch
    starts, and besides numba's pool it sets torch's intra-op threads of the calling thread to n.
    Unguarded, importing ffcv made every later torch op of that thread single-threaded, and a
    loader's thread count silently became the training step's.
    """
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
