"""Error types a user can act on.

:class:`InputError` covers everything wrong with what the user gave (a config knob, a data file, a model
name) and is raised before any model is loaded or any engine starts. ``lit-dash`` prints its message on
one line, without a traceback (``LIT_DASH_DEBUG=1`` shows the traceback). Errors that stop a running
job (a broken reward, a diverged loss) keep their traceback, since they point into the user's code.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the knob, file or line, and what to change."""


class ConfigError(InputError):
    """Knobs that are out of range or cannot work together."""


class RunStopped(RuntimeError):
    """A running job stopped on purpose because going on would train on garbage."""


def find_input_error(exc: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any: jsonargparse wraps errors raised while it builds the
    classes of a config (``Does not validate against any of the Union subtypes ...``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
