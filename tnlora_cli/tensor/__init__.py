"""Tensor algebra shared by every adapter: initialisers now; tensor-train and Tucker
contraction join here, never inside an adapter module."""

from __future__ import annotations



