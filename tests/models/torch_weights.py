"""What the PyTorch parity tests share. Import it after ``pytest.importorskip("torch")``."""

import torch


def perturb(module, seed=0, scale=0.05):
    """Adds ``scale`` times seeded Gaussian noise to every parameter of a torch ``module`` (in place,
    returned): random weights further from the init, so that a wrong transpose, layout or order shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module
