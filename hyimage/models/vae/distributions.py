"""The posterior returned by both VAEs' `encode`, and the output containers of `encode` and `decode`."""

from dataclasses import dataclass

import torch


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance, parameterised by mean and log-variance stacked on the channel axis."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn on the generator's device, then moved to the mean's."""
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over all but the batch axis."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=list(range(1, self.mean.ndim)))


@dataclass
class AutoencoderKLOutput:
    """What `encode` returns: the posterior over latents."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput:
    """What `decode` returns: the decoded images in [-1, 1] (unclamped)."""

    sample: torch.Tensor
