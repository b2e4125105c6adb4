"""files.write_dir_atomically: a directory is replaced whole or not at all."""

import os
import stat

import pytest

from dreamfusion_jax import files


def _write_files(contents):
  def write(tmp):
    for name, text in contents.items():
      path = os.path.join(tmp, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write(text)
  return write


def _tree(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path) as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_new_directory_replaces_the_old_one_whole(tmp_path):
  target = tmp_path / "model"
  files.write_dir_atomically(target, _write_files({"a.json": "1", "unet/w.bin": "old"}))
  files.write_dir_atomically(target, _write_files({"unet/w.bin": "new", "b.json": "2"}))
  assert _tree(target) == {os.path.join("unet", "w.bin"): "new", "b.json": "2"}  # a.json is gone
  assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary or .old directory left
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700


def test_failed_write_leaves_the_old_directory(tmp_path):
  target = tmp_path / "model"
  files.write_dir_atomically(target, _write_files({"a.json": "1"}))

  def fail_halfway(tmp):
    _write_files({"a.json": "half"})(tmp)
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    files.write_dir_atomically(target, fail_halfway)
  assert _tree(target) == {"a.json": "1"}
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_leftover_of_an_interrupted_swap_does_not_block_the_next(tmp_path):
  target = tmp_path / "model"
  files.write_dir_atomically(target, _write_files({"a.json": "1"}))
  os.makedirs(tmp_path / "model.old")
  (tmp_path / "model.old" / "stale").write_text("x")
  files.write_dir_atomically(target, _write_files({"a.json": "2"}))
  assert _tree(target) == {"a.json": "2"}
  assert sorted(os.listdir(tmp_path)) == ["model"]
