"""A DiT of the released width with fewer blocks, sized to a checkpoint of about N GB (for the load benchmarks).

No torch import: the load benchmarks' parent processes stay lean, so their children's peak RSS is their own.
"""

HIDDEN = 2048
PAIR_PARAMS = 51 * HIDDEN**2
"""Parameters of one double plus one single stream block, in units of hidden_size^2 (see models/dit/blocks.py)."""


def scaled_dit_config(gigabytes: float, bytes_per_param: float = 2.0, glyph: bool = False) -> dict:
    """Constructor arguments of a DiT whose block weights take about `gigabytes` GB at `bytes_per_param`."""
    pairs = max(1, round(gigabytes * 1e9 / bytes_per_param / PAIR_PARAMS))
    return dict(
        patch_size=[1, 1],
        in_channels=64,
        out_channels=64,
        hidden_size=HIDDEN,
        heads_num=16,
        mlp_width_ratio=4,
        mm_double_blocks_depth=pairs,
        mm_single_blocks_depth=pairs,
        rope_dim_list=[64, 64],
        text_states_dim=HIDDEN,
        glyph_byT5_v2=glyph,
    )
