"""Checkpoint I/O: safetensors weights plus a JSON card, checked on load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wind_bmi.model.checkpoint import CheckpointError, load_prior


def test_loading_rejects_corrupt_or_mismatched_weights(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    card_path = tmp_path / "model.json"
    shutil.copy(tiny_model, card_path)
    weights = tmp_path / "model.safetensors"
    shutil.copy(tiny_model.with_suffix(".safetensors"), weights)
    load_prior(card_path)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_prior(card_path)
    card = json.loads(tiny_model.read_text())
    card["architecture"]["dim"] = 64
    shutil.copy(tiny_model.with_suffix(".safetensors"), weights)
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError):
        load_prior(card_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "none.json")
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_prior(card_path)


def test_write_card_writes_through_a_link_and_keeps_it(tmp_path: Path) -> None:
    """An editable install links the package's card to the repository's: updating the card (report,
    band-limit fit) must reach the repository file, not replace the link with a copy."""
    from wind_bmi.model.checkpoint import write_card

    real = tmp_path / "repo" / "card.json"
    real.parent.mkdir()
    real.write_text(json.dumps({"name": "a"}))
    link = tmp_path / "card.json"
    link.symlink_to(real)
    write_card({"name": "b"}, link)
    assert link.is_symlink() and json.loads(real.read_text()) == {"name": "b"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_written_weights_and_states_are_readable_by_others(tiny_model: Path) -> None:
    """safetensors creates its files owner-only (0600); a shipped or shared prior must be readable
    like any other file the tools write (0644), its training state too."""
    import stat

    for f in (tiny_model.with_suffix(".safetensors"), tiny_model.parent / "train_state.safetensors"):
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & stat.S_IROTH and mode & stat.S_IRGRP, (f.name, oct(mode))
