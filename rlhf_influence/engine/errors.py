"""Errors raised by the attribution engine. Each names the problem and how to fix it."""


class InfluenceError(Exception):
    """Base class of this package's errors."""


class NoLoraError(InfluenceError, ValueError):
    """The model has no trainable PEFT LoRA weights to attribute."""


class UnsupportedLoraError(InfluenceError, NotImplementedError):
    """A trainable LoRA adapter is of a kind the engine cannot take per-record gradients of."""


class LossShapeError(InfluenceError, ValueError):
    """``loss_fn`` did not return one loss per record, or the batch layout does not match it."""


class NonFiniteError(InfluenceError, FloatingPointError):
    """A loss or a gradient is NaN or infinite."""


class UnknownTokenWarning(UserWarning):
    """Text given as a behaviour holds pieces the tokenizer maps to its unknown token."""
