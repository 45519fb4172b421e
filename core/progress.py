"""Progress bars: tqdm, shown on a terminal and silent in CI logs (or anywhere with `TQDM_DISABLE=1`)."""
from functools import partial

from tqdm.auto import tqdm

progress = partial(tqdm, disable=None, leave=False, dynamic_ncols=True)
