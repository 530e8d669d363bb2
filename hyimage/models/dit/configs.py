"""Architecture of the diffusion transformer: its constructor arguments, checked, frozen once resolved."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from hyimage.models.config_checks import check_bool, check_choice, check_int, check_int_list, check_number
from hyimage.variants import DIT_ARGUMENTS

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
MAX_DEPTH = 256  # blocks per stack (the released models: 20 double, 40 single)
MAX_WIDTH = 65536  # hidden and text widths (released: 3584)
MAX_HEADS = 1024
MAX_CHANNELS = 4096  # latent channels in and out (released: 64 / 128)


@dataclass(frozen=True)
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
        self._check_types_and_ranges()
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "rope_dim_list", tuple(self.rope_dim_list))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim:
            raise ValueError(
                f"rope_dim_list {self.rope_dim_list} must sum to the head dimension "
                f"hidden_size / heads_num = {self.head_dim}"
            )
        if any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"every entry of rope_dim_list must be even, got {self.rope_dim_list}")

    def _check_types_and_ranges(self) -> None:
        """Each field of the right type and within bounds far above the released models, before any other check."""
        check_int_list("patch_size", self.patch_size, 1, 64, range(2, 4))
        check_int("in_channels", self.in_channels, 1, MAX_CHANNELS)
        if self.out_channels is not None:
            check_int("out_channels", self.out_channels, 1, MAX_CHANNELS)
        check_int("hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_int("heads_num", self.heads_num, 1, MAX_HEADS)
        check_number("mlp_width_ratio", self.mlp_width_ratio, 0, 64)
        check_choice("mlp_act_type", self.mlp_act_type, ACTIVATIONS)
        check_int("mm_double_blocks_depth", self.mm_double_blocks_depth, 0, MAX_DEPTH)
        check_int("mm_single_blocks_depth", self.mm_single_blocks_depth, 0, MAX_DEPTH)
        check_int_list("rope_dim_list", self.rope_dim_list, 0, MAX_WIDTH, range(1, 4))
        check_choice("qk_norm_type", self.qk_norm_type, ("rms", "layer"))
        check_choice("text_projection", self.text_projection, ("single_refiner", "linear"))
        check_int("text_states_dim", self.text_states_dim, 1, MAX_WIDTH)
        check_number("rope_theta", self.rope_theta, 0, 1e9)
        for name in ("qkv_bias", "qk_norm", "guidance_embed", "use_attention_mask", "glyph_byT5_v2", "use_meanflow"):
            check_bool(name, getattr(self, name))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    def to_dict(self) -> dict[str, Any]:
        """The constructor keyword arguments (lists, as the official code writes them)."""
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["rope_dim_list"] = list(self.rope_dim_list)
        return out


DIT_CONFIGS: dict[str, DiTConfig] = {name: DiTConfig(**arguments) for name, arguments in DIT_ARGUMENTS.items()}
"""The released DiTs by variant name."""


def resolve_dit_config(config: str | dict | DiTConfig, source: str | None = None) -> DiTConfig:
    """A variant name, a dict of constructor arguments, or a DiTConfig, as a DiTConfig (frozen: shared safely).

    `source` (e.g. the JSON file the dict was read from) is named in the error of an invalid dict.
    """
    if isinstance(config, DiTConfig):
        return config
    if isinstance(config, str):
        if config not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT config {config!r}; choose one of {sorted(DIT_CONFIGS)} or pass a dict")
        return DIT_CONFIGS[config]
    if isinstance(config, dict):
        known = {f.name for f in fields(DiTConfig)}
        unknown = sorted(set(config) - known)
        where = f"{source}: " if source else ""
        if unknown:
            raise ValueError(f"{where}unknown DiT config keys {unknown}; the accepted keys are {sorted(known)}")
        try:
            return DiTConfig(**config)
        except ValueError as error:
            raise ValueError(f"{where}invalid DiT config: {error}") from None
    raise TypeError(f"config must be a variant name, a dict or a DiTConfig, got {type(config).__name__}")
