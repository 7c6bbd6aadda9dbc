import errno
import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from dreamfusion_trt import atomic
from dreamfusion_trt.atomic import WriteError
from dreamfusion_trt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dreamfusion_trt.config import RunConfig, from_dict, to_dict


def _trained_optimizer():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    return lin, opt


def test_round_trip_keeps_every_tensor_and_the_state(tmp_path):
    lin, opt = _trained_optimizer()
    cfg = from_dict({"train": {"iters": 17}, "prompt": {"text": "a red cube"}})
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    ckpt = Checkpoint(
        step=9, config=cfg, model=lin.state_dict(), optimizer=opt.state_dict(),
        rng={"cpu_gen": gen.get_state()}, extra={"latent_map.w": torch.ones(4, 3)}, state={"elapsed_s": 1.5},
    )  # fmt: skip
    path = save_checkpoint(ckpt, tmp_path / "run")
    assert path.name == "checkpoint.safetensors"
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 9
    back = load_checkpoint(tmp_path / "run")  # a run folder is accepted
    assert back.step == 9 and back.config == cfg and back.state == {"elapsed_s": 1.5}
    for k, v in lin.state_dict().items():
        assert torch.equal(back.model[k], v)
    lin2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(lin2.parameters(), lr=1e-2)
    opt2.load_state_dict(back.optimizer)
    for (a, sa), (b, sb) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and float(sa["step"]) == float(sb["step"])
    gen2 = torch.Generator()
    gen2.set_state(back.rng["cpu_gen"])
    assert torch.equal(torch.rand(5, generator=gen2), torch.rand(5, generator=gen))
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no temporary files left behind


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing-here")
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt or not a dreamfusion-trt checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="no dreamfusion-trt header"):
        load_checkpoint(foreign)


def test_truncated_checkpoint_is_refused(tmp_path):
    lin, opt = _trained_optimizer()
    path = save_checkpoint(Checkpoint(step=1, config=RunConfig(), model=lin.state_dict()), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(path)


def _small_checkpoint():
    lin, opt = _trained_optimizer()
    return Checkpoint(step=3, config=RunConfig(), model=lin.state_dict(), optimizer=opt.state_dict())


def test_flipped_byte_in_tensor_data_is_refused(tmp_path):
    path = save_checkpoint(_small_checkpoint(), tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is corrupt: its tensor data has sha256 [0-9a-f]{16}\.\.\., its header says"):
        load_checkpoint(path)


def test_checkpoint_without_a_hash_still_loads(tmp_path, caplog):
    """What versions before the hash wrote: safetensors' save_file with the header alone."""
    ckpt = _small_checkpoint()
    header = {"format_version": 1, "step": 3, "config": to_dict(ckpt.config), "optimizer": None, "state": {}}
    tensors = {f"model.{k}": v for k, v in ckpt.model.items()}
    save_file(tensors, str(tmp_path / "checkpoint.safetensors"), metadata={"dreamfusion_trt": json.dumps(header)})
    with caplog.at_level(logging.DEBUG, logger="dreamfusion_trt.checkpoint"):
        back = load_checkpoint(tmp_path)
    assert back.step == 3 and all(torch.equal(back.model[k], v) for k, v in ckpt.model.items())
    assert "no data hash" in caplog.text


def test_written_through_one_temporary_with_an_ordinary_mode(tmp_path, monkeypatch):
    """safetensors' own temp-and-rename used to leave the file 0600 and a '.tmpXXXXXX' behind."""
    import dreamfusion_trt.checkpoint as ckpt_mod

    assert not hasattr(ckpt_mod, "save_file")  # nothing writes through safetensors' file writer
    old = os.umask(0o022)
    try:
        path = save_checkpoint(_small_checkpoint(), tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    assert "data_sha256" in json.loads((tmp_path / "checkpoint.json").read_text())


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _small_checkpoint()
    path = save_checkpoint(first, tmp_path)
    before = path.read_bytes()

    def full_disk(fd, data):
        os.write(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", full_disk)
    second = _small_checkpoint()
    second.step = 4
    with pytest.raises(WriteError, match=r"could not write '.*checkpoint\.safetensors': No space left on device \(needed [0-9.]+ (MB|bytes)"):
        save_checkpoint(second, tmp_path)
    assert path.read_bytes() == before
    assert load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]


def test_checkpoint_step_reads_the_file_not_its_sidecar_which_can_lag(tmp_path):
    """A kill between the checkpoint's rename and its JSON sidecar's leaves the sidecar one
    checkpoint behind: the step a run resumes from is the file's own."""
    from dreamfusion_trt.checkpoint import checkpoint_header_step
    from dreamfusion_trt.train.driver import checkpoint_step

    lin = torch.nn.Linear(2, 2)
    save_checkpoint(Checkpoint(step=4, config=RunConfig(), model=lin.state_dict()), tmp_path)
    stale = (tmp_path / "checkpoint.json").read_text()
    path = save_checkpoint(Checkpoint(step=6, config=RunConfig(), model=lin.state_dict()), tmp_path)
    (tmp_path / "checkpoint.json").write_text(stale)  # as if killed before the sidecar's rename
    assert checkpoint_step(tmp_path) == 6 == load_checkpoint(tmp_path).step == checkpoint_header_step(path)
    assert checkpoint_step(tmp_path / "none") == 0
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a truncated header
    assert checkpoint_step(tmp_path) == 0
    with pytest.raises(ValueError, match="no complete safetensors header"):
        checkpoint_header_step(path)
