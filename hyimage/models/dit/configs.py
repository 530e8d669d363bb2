"""Architecture of the diffusion transformer, and the three released variants by name."""

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


@dataclass
class DiTConfig:
    """The official `HYImageDiffusionTransformer` constructor arguments, with the official defaults."""

    patch_size: tuple[int, ...] = (1, 2, 2)
    in_channels: int = 4
    out_channels: int | None = None
    hidden_size: int = 3072
    heads_num: int = 24
    mlp_width_ratio: float = 4.0
    mlp_act_type: str = "gelu_tanh"
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    rope_dim_list: tuple[int, ...] = (16, 56, 56)
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_type: str = "rms"
    guidance_embed: bool = False
    text_projection: str = "single_refiner"
    use_attention_mask: bool = True
    text_states_dim: int = 4096
    rope_theta: int = 256
    glyph_byT5_v2: bool = False
    use_meanflow: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.rope_dim_list = tuple(self.rope_dim_list)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 (image) or 3 (video) entries, got {self.patch_size}")
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(
                f"rope_dim_list {self.rope_dim_list} must sum to the head dimension "
                f"hidden_size / heads_num = {self.head_dim}"
            )
        if any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"every entry of rope_dim_list must be even, got {self.rope_dim_list}")
        if self.mlp_act_type not in ACTIVATIONS:
            raise ValueError(f"mlp_act_type must be one of {ACTIVATIONS}, got {self.mlp_act_type!r}")
        if self.qk_norm_type not in ("rms", "layer"):
            raise ValueError(f"qk_norm_type must be 'rms' or 'layer', got {self.qk_norm_type!r}")
        if self.text_projection not in ("single_refiner", "linear"):
            raise ValueError(f"text_projection must be 'single_refiner' or 'linear', got {self.text_projection!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    def to_dict(self) -> dict[str, Any]:
        """The constructor keyword arguments (lists, as the official code writes them)."""
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["rope_dim_list"] = list(self.rope_dim_list)
        return out


_RELEASED = DiTConfig(
    patch_size=(1, 1),
    in_channels=64,
    out_channels=64,
    hidden_size=3584,
    heads_num=28,
    mlp_width_ratio=4,
    mm_double_blocks_depth=20,
    mm_single_blocks_depth=40,
    rope_dim_list=(64, 64),
    text_states_dim=3584,
    glyph_byT5_v2=True,
)

DIT_CONFIGS: dict[str, DiTConfig] = {
    "hunyuanimage-v2.1": _RELEASED,
    "hunyuanimage-v2.1-distilled": replace(_RELEASED, guidance_embed=True, use_meanflow=True),
    "hunyuanimage-refiner": DiTConfig(
        patch_size=(1, 1, 1),
        in_channels=128,
        out_channels=64,
        hidden_size=3328,
        heads_num=26,
        mlp_width_ratio=4,
        mm_double_blocks_depth=20,
        mm_single_blocks_depth=40,
        rope_dim_list=(16, 56, 56),
        text_states_dim=3584,
        guidance_embed=True,
        use_meanflow=True,
    ),
}


def resolve_dit_config(config: str | dict | DiTConfig) -> DiTConfig:
    """A variant name, a dict of constructor arguments, or a DiTConfig, as a (new) DiTConfig."""
    if isinstance(config, DiTConfig):
        return replace(config)
    if isinstance(config, str):
        if config not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT config {config!r}; choose one of {sorted(DIT_CONFIGS)} or pass a dict")
        return replace(DIT_CONFIGS[config])
    if isinstance(config, dict):
        known = {f.name for f in fields(DiTConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}; the accepted keys are {sorted(known)}")
        return DiTConfig(**config)
    raise TypeError(f"config must be a variant name, a dict or a DiTConfig, got {type(config).__name__}")
