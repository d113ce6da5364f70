"""Shared fixtures: tiny datasets in the real file formats, written into tmp_path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
