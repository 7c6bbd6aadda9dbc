"""`bench.host_profile`: a tiny CPU run of two variants writes every phase's host, wall and
operator numbers; an unknown variant is one clear error. No timing is asserted."""

import json

import pytest
import torch
from test_batch import _one_thread  # noqa: F401  (autouse: one intra-op thread)

from dreamfusion_trt.bench.host_profile import VARIANTS, main
from dreamfusion_trt.bench.train import STAGES

# The stages `Trainer.train_step` marks on one process (grad_sync only under data parallel).
MARKED = ("plan", "render", "vae_encode", "guidance", "backward", "optimizer")




@pytest.mark.slow  # ~30 s on one thread, most of it torch.profiler's post-processing on the CPU
def test_tiny_host_profile_writes_every_variant_and_phase(tmp_path):
    out = tmp_path / "host_profile.json"
    assert main(["--tiny", "--device", "cpu", "--variants", "default,eager_optim", "--warmup", "1", "--blocks", "1",
                 "--steps", "2", "--top-ops", "5", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["device"], result["arch"], result["K"]) == ("cpu", "tiny", 1)
    assert result["torch"] == torch.__version__ and result["args"]["variants"] == "default,eager_optim"
    assert set(result["variants"]) == {"default", "eager_optim"}
    assert result["variants"]["eager_optim"]["overrides"] == {"train": {"compile_optimizer": "off"}}
    assert set(MARKED) <= set(STAGES)
    for name, variant in result["variants"].items():
        assert "error" not in variant, variant.get("error")
        assert variant["renderer"] == "torch"  # no nerfacc on a CPU
        for phase in ("latent", "rgb"):
            row = variant[phase]
            assert row["wall_ms"] > 0 and len(row["walls_ms"]) == 1
            assert list(row["host_stage_ms"]) == list(MARKED), (name, phase)
            assert all(v >= 0 for v in row["host_stage_ms"].values())
            assert row["host_sum_ms"] == pytest.approx(sum(row["host_stage_ms"].values())) and row["host_sum_ms"] > 0
            assert set(row["event_stage_ms"]) == set(STAGES)
            assert row["busy_ms"] is None  # profiled on CUDA only
            ops = row["top_cpu_ops"]
            assert 0 < len(ops) <= 5
            for op in ops:
                assert set(op) == {"name", "self_cpu_ms_per_step", "calls_per_step"}
                assert isinstance(op["name"], str) and op["self_cpu_ms_per_step"] >= 0 and op["calls_per_step"] > 0
            times = [op["self_cpu_ms_per_step"] for op in ops]
            assert times == sorted(times, reverse=True)


def test_an_unknown_variant_is_an_error_naming_the_known_ones(tmp_path, capsys):
    out = tmp_path / "host_profile.json"
    with pytest.raises(SystemExit) as info:
        main(["--tiny", "--device", "cpu", "--variants", "default,bogus", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown --variants 'bogus'" in err
    assert all(name in err for name in VARIANTS) and "each_march" in err
    assert not out.exists()  # refused before anything ran
