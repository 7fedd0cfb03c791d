"""Fixtures shared by every test: seeding. Shared helpers live in ``helpers.py``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
