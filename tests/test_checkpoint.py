"""Checkpoint bookkeeping: a crash in the middle of a save never makes resume pick a partial one."""

import pytest

from blip2_dist.checkpoint import COMPLETE, LATEST, TrainState, find_resume_checkpoint, tag_for


def _ckpt(root, step, complete=True):
    path = root / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text(tag_for(step))
    return path


def test_fresh_run_and_auto(tmp_path):
    assert find_resume_checkpoint(tmp_path, "") is None
    assert find_resume_checkpoint(tmp_path, "auto") is None
    first = _ckpt(tmp_path, 10)
    (tmp_path / "checkpoints" / LATEST).write_text(first.name + "\n")
    assert find_resume_checkpoint(tmp_path, "auto") == first


def test_crash_after_shards_before_complete(tmp_path):
    # The crashed save of step 20 wrote its files but neither COMPLETE nor the new `latest`.
    done = _ckpt(tmp_path, 10)
    (tmp_path / "checkpoints" / LATEST).write_text(done.name + "\n")
    _ckpt(tmp_path, 20, complete=False)
    assert find_resume_checkpoint(tmp_path, "auto") == done


def test_latest_naming_an_incomplete_folder_falls_back(tmp_path):
    done = _ckpt(tmp_path, 10)
    partial = _ckpt(tmp_path, 20, complete=False)
    (tmp_path / "checkpoints" / LATEST).write_text(partial.name + "\n")
    assert find_resume_checkpoint(tmp_path, "auto") == done
    (tmp_path / "checkpoints" / LATEST).unlink()  # lost `latest`: the newest complete one
    assert find_resume_checkpoint(tmp_path, "auto") == done


def test_explicit_path_must_be_complete(tmp_path):
    partial = _ckpt(tmp_path, 20, complete=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume_checkpoint(tmp_path, str(partial))


def test_train_state_round_trip():
    state = TrainState(step=3, epoch=1, batch_in_epoch=7, losses=[1.0, 0.5], best_metric=0.2, best_step=2)
    assert TrainState.from_state_dict(state.state_dict()) == state
