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


def forward_calls(model: torch.nn.Module, run: Callable[[], object]) -> dict:
    """How many times each submodule's forward ran during ``run()``, by path. Counted through an instance
    attribute wrapping its forward, not a hook, so patched code that runs the original code when a hook is
    set is not sent down that path."""
    calls = {path: 0 for path, _ in model.named_modules()}
    wrapped = []
    for path, module in model.named_modules():
        def counting(*args, _path=path, _forward=module.forward, **kwargs):
            calls[_path] += 1
            return _forward(*args, **kwargs)
        module.forward = counting
        wrapped.append(module)
    try:
        run()
    finally:
        for module in wrapped:
            del module.forward
    return calls


def assert_report_tells_what_runs(model: torch.nn.Module, report, run: Callable[[], object]) -> None:
    """Every module the report lists as replaced runs; none it lists as computed inside another does, and none
    of those is patched."""
    from fasttx.patching import is_patched
    calls = forward_calls(model, run)
    modules = dict(model.named_modules())
    for path, what in report.replaced:
        assert calls[path] > 0, f"{path} is listed as replaced ({what}) but never runs"
    for path, parent in report.fused:
        assert calls[path] == 0, f"{path} is listed as computed inside {parent} but its forward runs"
        assert not is_patched(modules[path]), path
        assert parent in dict(report.replaced)
