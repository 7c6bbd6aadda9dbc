import json

import pytest
import torch
from safetensors.torch import save_file

from dreamfusion_trt.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dreamfusion_trt.config import RunConfig, from_dict


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
