"""Optional tiny-cuda-nn hash grid, one fused CUDA encoding per prompt.

Same interface as `HashGridEncoding`: ``forward(x [K, N, 3] in [0, 1]) -> [K, N, L * F]`` (float32).
Only constructed when ``field.backend == "tcnn"``; raises ValueError when tinycudann is missing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import FieldConfig
from .hashgrid import level_resolutions

logger = logging.getLogger(__name__)


def _import_tinycudann():
    try:
        import tinycudann  # noqa: PLC0415
    except ImportError as exc:  # also covers a broken build (missing CUDA libraries)
        raise ValueError(
            "field.backend=tcnn needs tinycudann, which is not installed (or does not import: "
            f"{exc}); install it from https://github.com/NVlabs/tiny-cuda-nn or use field.backend=torch"
        ) from exc
    return tinycudann


class TcnnHashGrid(nn.Module):
    """K tinycudann HashGrid encodings; parameters live inside each `tcnn.Encoding`."""

    def __init__(self, num_prompts: int, cfg: FieldConfig) -> None:
        super().__init__()
        tcnn = _import_tinycudann()
        resolutions = level_resolutions(cfg)
        growth = (resolutions[-1] / resolutions[0]) ** (1.0 / max(cfg.num_levels - 1, 1))
        encoding_config = {
            "otype": "HashGrid",
            "n_levels": cfg.num_levels,
            "n_features_per_level": cfg.level_dim,
            "log2_hashmap_size": cfg.log2_hashmap_size,
            "base_resolution": cfg.base_resolution,
            "per_level_scale": growth,
        }
        self.num_prompts = num_prompts
        self.output_dim = cfg.num_levels * cfg.level_dim
        self.encodings = nn.ModuleList(
            tcnn.Encoding(n_input_dims=3, encoding_config=encoding_config, dtype=torch.float32)
            for _ in range(num_prompts)
        )
        logger.info("tinycudann hash grid: %d prompts, %s", num_prompts, encoding_config)

    def forward(self, x: torch.Tensor, prompts: slice | None = None) -> torch.Tensor:
        encodings = self.encodings if prompts is None else self.encodings[prompts]
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[0] != len(encodings):
            raise ValueError(f"expected positions of shape [{len(encodings)}, N, 3], got {tuple(x.shape)}")
        x = x.float().clamp(0.0, 1.0)
        return torch.stack([enc(x[i].contiguous()).float() for i, enc in enumerate(encodings)], dim=0)
