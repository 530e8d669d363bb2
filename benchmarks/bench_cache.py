"""DiT work per image with and without each step cache, on the tiny tree, and each run's decisions per step.

The tiny tree (tests/fixtures/tiny_tree.py: random weights, the released layouts) runs the base model (50 steps,
classifier-free guidance) and the distilled model (8 steps) at 64x64 with each cache. Counted inside the DiT's
forward only: its FLOPs (`torch.utils.flop_counter.FlopCounterMode`, matrix products and attention) and the
transformer-block evaluations per sample (a block run on a batch of 2 counts 2). Decisions per step: one letter
per sample of the DiT's batch ([unconditional; conditional] for the base model), F = every block ran, c = cached.

FBCache still runs everything outside the blocks after the first (embedders, the ByT5 mapper, the token
refiner, the final layer); in the tiny tree those dominate (the ByT5 mapper is 2048 wide, the blocks 64), so its
FLOP ratio is near 1 there while its block ratio is what a full-size DiT (whose 60 blocks dominate) would see.
TaylorSeer's predicted steps call nothing. TaylorSeer's schedule is fixed by its options, so its ratio holds for any weights; FBCache's decisions depend on
how the first block's residual moves, which random weights do not show: its ratio here says nothing about the
released model (measure it there with `pipe.cache_stats` or the PNG metadata).

    python benchmarks/bench_cache.py [--size 64] [--threads 1]
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from hyimage import HunyuanImagePipeline  # noqa: E402
from tests.fixtures.qwen_tokenizer import write_qwen_tokenizer  # noqa: E402
from tests.fixtures.tiny_tree import write_tiny_tree  # noqa: E402

CACHES = [
    None,
    ("fbcache", {"threshold": 0.05}),
    ("fbcache", {"threshold": 0.5}),
    ("taylorseer", {"interval": 4, "order": 2}),
    ("taylorseer", {"interval": 5, "order": 1}),
]


class DiTCounter:
    """FLOPs and block evaluations (per sample) inside the DiT's forward calls."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self.flops = 0
        self.block_rows = 0
        self._counter: FlopCounterMode | None = None
        dit.register_forward_pre_hook(self._enter)
        dit.register_forward_hook(self._leave)
        for block in [*dit.double_blocks, *dit.single_blocks]:
            block.register_forward_pre_hook(self._block)

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def _leave(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._counter.__exit__(None, None, None)
        self.flops += self._counter.get_total_flops()

    def _block(self, module: torch.nn.Module, args: tuple) -> None:
        self.block_rows += args[0].shape[0]


def run(root: Path, variant: str, cache: tuple | None, size: int) -> tuple[int, int, dict | None]:
    pipe = HunyuanImagePipeline.from_pretrained(
        model_root=root, model_name=variant, reprompt_model=None, refiner=False, progress_bar=False
    )
    if cache is not None:
        pipe.enable_cache(cache[0], **cache[1])
    counter = DiTCounter(pipe.dit)
    pipe(prompt='a shop sign that reads "OPEN"', width=size, height=size, seed=1, output_type="latent")
    return counter.flops, counter.block_rows, pipe.cache_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_qwen_tokenizer(Path(folder) / "tokenizer")
        root = write_tiny_tree(Path(folder) / "ckpts", tokenizer)
        for variant in ("hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled"):
            print(f"\n{variant} ({args.size}x{args.size}, one image)")
            print(f"{'cache':38} {'DiT GFLOP':>10} {'ratio':>6} {'block evals':>11} {'ratio':>6} {'full steps':>10}")
            baseline = None
            for cache in CACHES:
                flops, blocks, stats = run(root, variant, cache, args.size)
                baseline = baseline or (flops, blocks)
                name = "none" if stats is None else stats["cache"]
                full = "all" if stats is None else f"{stats['full_steps']}/{stats['steps']}"
                print(
                    f"{name:38} {flops / 1e9:10.3f} {baseline[0] / flops:5.2f}x {blocks:11d} "
                    f"{baseline[1] / blocks:5.2f}x {full:>10}"
                )
                if stats is not None:
                    print(f"{'':38} decisions: {' '.join(stats['decisions'])}")


if __name__ == "__main__":
    main()
