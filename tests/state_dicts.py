"""Shared by the patching tests: a state_dict through torch.save / torch.load into another model."""
import io

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
