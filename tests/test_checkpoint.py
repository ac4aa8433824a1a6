"""Checkpoint bookkeeping: a crash in the middle of a save never makes resume pick a partial one;
`--resume` says what it loads or why it starts fresh; nothing unusable is loaded or deleted."""

import json

import pytest

from blip2_dist.checkpoint import (
    COMPLETE,
    LATEST,
    Checkpointer,
    TrainState,
    file_sizes,
    find_resume_checkpoint,
    plan_resume,
    tag_for,
)
from blip2_dist.errors import UserError


def _ckpt(root, step, complete=True):
    """A checkpoint folder as Checkpointer.save leaves it: shards, train_state.json, COMPLETE last."""
    path = root / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"y" * 50)
    (path / "train_state.json").write_text(json.dumps(TrainState(step=step).state_dict()))
    if complete:
        (path / COMPLETE).write_text(json.dumps({"tag": path.name, "files": file_sizes(path)}))
    return path


def _latest(root, path):
    (root / "checkpoints" / LATEST).write_text(path.name + "\n")


def test_fresh_run_and_auto(tmp_path):
    assert find_resume_checkpoint(tmp_path, "") is None
    plan = plan_resume(tmp_path / "typo", "auto")
    assert plan.path is None and "starting fresh" in plan.notes[0] and "typo does not exist" in plan.notes[0]
    plan = plan_resume(tmp_path, "auto")
    assert plan.path is None and "has no checkpoints folder" in plan.notes[0] and "--output-dir" in plan.notes[0]
    first = _ckpt(tmp_path, 10)
    _latest(tmp_path, first)
    plan = plan_resume(tmp_path, "auto")
    assert plan.path == first and plan.notes == [f"--resume auto: resuming from {first}"]


def test_crash_after_shards_before_complete(tmp_path):
    # The crashed save of step 20 wrote its files but neither COMPLETE nor the new `latest`.
    done = _ckpt(tmp_path, 10)
    _latest(tmp_path, done)
    partial = _ckpt(tmp_path, 20, complete=False)
    plan = plan_resume(tmp_path, "auto")
    assert plan.path == done
    assert (
        plan.notes[0] == f"warning: checkpoint {partial} has no COMPLETE marker (its save did not finish): "
        "skipped, left in place"
    )
    newer = _ckpt(tmp_path, 30)  # complete, but `latest` was not updated (or a resume went back to 10)
    assert plan_resume(tmp_path, "auto").path == done
    assert any(
        n.startswith(f"note: checkpoint {newer} is newer than the one latest names")
        for n in plan_resume(tmp_path, "auto").notes
    )


def test_latest_naming_an_incomplete_folder_falls_back_loudly(tmp_path):
    done = _ckpt(tmp_path, 10)
    partial = _ckpt(tmp_path, 20, complete=False)
    _latest(tmp_path, partial)
    plan = plan_resume(tmp_path, "auto")
    assert plan.path == done
    assert any(str(partial) in n and "no COMPLETE marker" in n and "left in place" in n for n in plan.notes)
    (tmp_path / "checkpoints" / LATEST).unlink()  # lost `latest`: the newest usable one
    assert find_resume_checkpoint(tmp_path, "auto") == done


def test_latest_naming_a_missing_checkpoint(tmp_path):
    done = _ckpt(tmp_path, 10)
    (tmp_path / "checkpoints" / LATEST).write_text(tag_for(30) + "\n")
    plan = plan_resume(tmp_path, "auto")
    assert plan.path == done and "names step_00000030, which does not exist" in plan.notes[0]


@pytest.mark.parametrize("damage", ["truncate", "delete", "state"])
def test_damaged_newest_is_skipped_and_named(tmp_path, damage):
    done = _ckpt(tmp_path, 10)
    newest = _ckpt(tmp_path, 20)
    _latest(tmp_path, newest)
    shard = newest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        shard.write_bytes(b"x" * 40)
        expected = "mp_rank_00_model_states.pt at 40 bytes, 100 when saved"
    elif damage == "delete":
        shard.unlink()
        expected = "lacks mp_rank_00_model_states.pt"
    else:
        (newest / "train_state.json").write_text("{")
        expected = "train_state.json at 1 bytes"
    plan = plan_resume(tmp_path, "auto")
    assert plan.path == done
    assert any(str(newest) in n and expected in n for n in plan.notes), plan.notes
    with pytest.raises(UserError, match=f"--resume 20: checkpoint {newest} .*{expected[:20]}"):
        plan_resume(tmp_path, "20")


def test_no_usable_checkpoint_starts_fresh_naming_each(tmp_path):
    a = _ckpt(tmp_path, 10, complete=False)
    b = _ckpt(tmp_path, 20)
    (b / "adapter" / "adapter_model.safetensors").unlink()
    plan = plan_resume(tmp_path, "auto")
    assert plan.path is None and "no usable checkpoint" in plan.notes[-1]
    assert sum(str(a) in n or str(b) in n for n in plan.notes) == 2
    assert a.is_dir() and b.is_dir()  # reported, never deleted


def test_explicit_step_or_path(tmp_path):
    done = _ckpt(tmp_path, 10)
    assert plan_resume(tmp_path, "10").path == done
    assert plan_resume(tmp_path / "elsewhere", str(done)).path == done
    partial = _ckpt(tmp_path, 20, complete=False)
    with pytest.raises(UserError, match="no COMPLETE marker"):
        plan_resume(tmp_path, str(partial))
    with pytest.raises(UserError, match="step_00000030 does not exist"):
        plan_resume(tmp_path, "30")


def test_marker_from_before_file_lists_still_loads(tmp_path):
    old = _ckpt(tmp_path, 10)
    (old / COMPLETE).write_text(old.name + "\n")  # COMPLETE used to hold the tag only
    assert find_resume_checkpoint(tmp_path, "auto") == old


def test_prune_keeps_newer_and_unusable_checkpoints(tmp_path):
    # A run resumed at step 10 has just saved step 20; step 30 (complete) and 40 (partial) are from
    # before the resume. keep_last=1 deletes only complete checkpoints older than the one saved.
    ckpts = {step: _ckpt(tmp_path, step, complete=step != 40) for step in (5, 10, 20, 30, 40)}
    partial_old = _ckpt(tmp_path, 7, complete=False)
    Checkpointer(tmp_path, keep_last=1, export_adapter=None)._prune(ckpts[20])
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert left == [partial_old.name, tag_for(20), tag_for(30), tag_for(40)]


def test_train_state_round_trip():
    state = TrainState(step=3, epoch=1, batch_in_epoch=7, losses=[1.0, 0.5], best_metric=0.2, best_step=2)
    assert TrainState.from_state_dict(state.state_dict()) == state
