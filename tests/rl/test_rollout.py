"""Rollout bookkeeping (`rl/rollout.py`): the seeded data cursor covers each epoch and resumes exactly."""

from __future__ import annotations

import pytest

from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.rollout import DataCursor


def test_data_cursor_covers_each_epoch_and_resumes_identically():
    cursor = DataCursor(n=5, seed=3)
    first = cursor.take(3) + cursor.take(3) + cursor.take(4)  # crosses two epoch boundaries
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    assert first[:5] != first[5:]  # reshuffled per epoch
    replay = DataCursor(n=5, seed=3)
    replay.take(4)
    state = replay.state_dict()
    resumed = DataCursor(n=5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(6) == first[4:]
    with pytest.raises(TgrlError, match="same problems dataset"):
        DataCursor(n=6, seed=3).load_state_dict(state)
