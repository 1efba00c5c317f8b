"""Small frictions a new user hit (issue 19, item 4): each one-line error, message and default, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvdm.data.cache import LatentCache
from lvdm.errors import DataError


def test_a_missing_latent_cache_names_the_command_that_builds_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        LatentCache(tmp_path / "no-cache")
    assert "python -m lvdm.cache" in str(caught.value) and "lvdm.data.cache" not in str(caught.value)
