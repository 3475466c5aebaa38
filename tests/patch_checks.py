"""Shared by the patching tests: what "patched behaves as unpatched" means beyond one forward."""
import io
from typing import Callable

import torch


def assert_loads_through_a_file(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Save source's state_dict to bytes, load it into target, and check every entry arrived unchanged."""
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    target.load_state_dict(torch.load(buf))
    assert list(target.state_dict()) == list(source.state_dict())
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def adamw_losses(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], steps: int = 30,
                 seed: int = 7) -> torch.Tensor:
    """The loss at each of ``steps`` AdamW steps (lr 1e-3) from ``seed``, as float64."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)
