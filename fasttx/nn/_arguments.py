"""Constructor argument checks shared by the fasttx.nn modules."""
import operator


def positive_int(owner: str, name: str, value) -> int:
    """value as an int, or a ValueError naming owner and argument: a size of 0 or less has no layer to
    build (torch.nn.MultiheadAttention refuses it too), and would fail later with a less clear error."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number <= 0:
        raise ValueError(f"fasttx.nn.{owner}: {name} must be positive (an int >= 1), got {value!r}")
    return number
