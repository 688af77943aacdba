"""The codec in use: the compiled ``_codec`` unless FASTMQTT_NO_EXTENSIONS=1 or it
failed to build, in which case the pure-Python ``_codec_py`` (same API).

``COMPILED`` tells which one was loaded; a test fails when it is False in a
normal install.
"""

import os

_NAMES = (
    "Will Connect Connack Publish Puback Pubrec Pubrel Pubcomp Subscription Subscribe "
    "Suback Unsubscribe Unsuback Pingreq Pingresp Disconnect Auth encode decode "
    "PublishTemplate Decoder"
).split()

if os.environ.get("FASTMQTT_NO_EXTENSIONS") == "1":
    from . import _codec_py as _impl

    COMPILED = False
else:
    try:
        from . import _codec as _impl

        COMPILED = True
    except ImportError:  # pragma: no cover - exercised only on a broken build
        from . import _codec_py as _impl

        COMPILED = False

globals().update({name: getattr(_impl, name) for name in _NAMES})
IMPLEMENTATION = _impl

__all__ = [*_NAMES, "COMPILED", "IMPLEMENTATION"]
